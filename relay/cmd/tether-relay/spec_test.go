package main

import (
	"strings"
	"testing"

	"github.com/tetherfleet/tether/frames/cli"
)

// TestSpecNames holds --help's variable names to envconfig's own naming.
func TestSpecNames(t *testing.T) {
	if err := cli.CheckNames(&spec{}); err != nil {
		t.Fatal(err)
	}
}

// TestRelayID: the default relay ID is the host name's first label,
// lower-cased; a configured one must be a DNS label.
func TestRelayID(t *testing.T) {
	host := func(name string) func() (string, error) { return func() (string, error) { return name, nil } }
	cases := []struct {
		configured, host, want string
		ok                     bool
	}{
		{"", "Relay-1.Example.COM", "relay-1", true},
		{"", "edge07", "edge07", true},
		{"relay-b", "ignored_host", "relay-b", true},
		{"", "bad_host.example.com", "", false},
		{"Relay-B", "x", "", false},
		{"relay.b", "x", "", false},
		{"-relay", "x", "", false},
	}
	for _, c := range cases {
		got, err := relayID(c.configured, host(c.host))
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("relayID(%q, host %q) = %q, %v; want %q (ok %v)", c.configured, c.host, got, err, c.want, c.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "TETHER_RELAY_ID") {
			t.Errorf("error %q does not name TETHER_RELAY_ID", err)
		}
	}
}
