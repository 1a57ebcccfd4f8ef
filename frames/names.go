package frames

import (
	"errors"
	"fmt"
)

// Name grammar. This is the one home of the rule; the agent checks its
// settings with it and the control plane checks every enrollment and
// registration with it.
//
// A device name is a DNS label of 1 to MaxDeviceName characters: lowercase
// letters, digits and inner hyphens. A service name is 1 to MaxServiceName
// characters of the same alphabet. A public hostname is SERVICE-DEVICE.
const (
	MaxDeviceName  = 40
	MaxServiceName = 20
)

// ErrBadName is wrapped by every error of ValidDeviceName and ValidServiceName.
var ErrBadName = errors.New("invalid name")

// ValidDeviceName checks a device name against the grammar above.
func ValidDeviceName(name string) error {
	if !isSlug(name, MaxDeviceName) {
		return fmt.Errorf("%w: device name %q is not a DNS-safe slug (1-%d of a-z, 0-9, inner '-')", ErrBadName, name, MaxDeviceName)
	}
	return nil
}

// ValidServiceName checks a service name against the grammar above.
func ValidServiceName(name string) error {
	if !isSlug(name, MaxServiceName) {
		return fmt.Errorf("%w: service name %q is not a DNS-safe slug (1-%d of a-z, 0-9, inner '-')", ErrBadName, name, MaxServiceName)
	}
	return nil
}

// MaxLabel is the longest DNS label, a public hostname's first label.
const MaxLabel = 63

// ValidLabel checks a hostname label (1 to MaxLabel of a-z, 0-9, inner '-').
func ValidLabel(label string) error {
	if !isSlug(label, MaxLabel) {
		return fmt.Errorf("%w: hostname label %q is not a DNS-safe slug (1-%d of a-z, 0-9, inner '-')", ErrBadName, label, MaxLabel)
	}
	return nil
}

// isSlug reports whether s is 1..max of a-z, 0-9 and inner '-' (written
// out rather than with regexp: the agent checks names too).
func isSlug(s string, max int) bool {
	if len(s) == 0 || len(s) > max || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}
