package frames

import (
	"errors"
	"strings"
	"testing"
)

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		name        string
		device, svc bool
	}{
		{"pi01", true, true},
		{"a", true, true},
		{"lab-cam", true, false},
		{"xn--80ak6aa92e", false, false},
		{"xnfoo", true, true},
		{"page--2", false, false},
		{"www", false, true},
		{"admin", false, true},
		{"relay", false, true},
		{"0", true, true},
		{"", false, false},
		{"-pi", false, false},
		{"pi-", false, false},
		{"web-lab", true, false},
		{"Pi01", false, false},
		{"pi_01", false, false},
		{"pi.01", false, false},
		{"ü", false, false},
		{strings.Repeat("a", 20), true, true},
		{strings.Repeat("a", 21), true, false},
		{strings.Repeat("a", 40), true, false},
		{strings.Repeat("a", 41), false, false},
	} {
		if err := ValidDeviceName(tc.name); (err == nil) != tc.device || err != nil && !errors.Is(err, ErrBadName) {
			t.Errorf("ValidDeviceName(%q) = %v, want ok=%v", tc.name, err, tc.device)
		}
		if err := ValidServiceName(tc.name); (err == nil) != tc.svc || err != nil && !errors.Is(err, ErrBadName) {
			t.Errorf("ValidServiceName(%q) = %v, want ok=%v", tc.name, err, tc.svc)
		}
	}
}

func TestLegacyServiceName(t *testing.T) {
	for name, want := range map[string]bool{"web-lab": true, "web": false, "xn--web": false, "-web": false, "a-b-c": true} {
		if got := LegacyServiceName(name); got != want {
			t.Errorf("LegacyServiceName(%q) = %v, want %v", name, got, want)
		}
	}
}
