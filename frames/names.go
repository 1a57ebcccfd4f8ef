package frames

import (
	"errors"
	"fmt"
	"strings"
)

// Name grammar. This is the one home of the rule; the agent checks its
// settings with it and the control plane checks every enrollment and
// registration with it.
//
// A device name is a DNS label of 1 to MaxDeviceName characters: lowercase
// letters, digits and inner hyphens, not starting with "xn--" (IDN
// look-alikes), without "--" anywhere (a hostname whose natural name is
// taken gets a "--N" suffix, which is then nobody's SERVICE-DEVICE) and
// not a reserved name (see Reserved). A service name is 1
// to MaxServiceName lowercase letters and digits, without '-' ("api" is a
// fine service name: its hostname is api-DEVICE). A public hostname label
// is SERVICE-DEVICE, so it splits one way only, at its first '-': device
// "cam" cannot take "web-lab-cam", the name of device "lab-cam"'s service
// "web". No such label can be a reserved name, which has no '-'.
//
// Older releases allowed '-' in service names. Such a name that already
// holds a lease keeps it (LegacyServiceName); the control plane gives no
// new lease to one.
const (
	MaxDeviceName  = 40
	MaxServiceName = 20
)

// ErrBadName is wrapped by every error of the name checks.
var ErrBadName = errors.New("invalid name")

// reserved are names no device may take: they read as the operator's own (relays' own hostnames are reserved on top of these, by
// the control plane, from their hellos).
var reserved = map[string]bool{
	"www": true, "admin": true, "api": true, "relay": true, "relays": true, "tether": true,
	"root": true, "localhost": true, "mail": true, "status": true, "login": true, "auth": true,
	"cluster": true, "controlplane": true, "dashboard": true, "console": true, "metrics": true,
}

// Reserved reports whether name is reserved for the operator: www, admin,
// api, relay, tether, and a few more of the kind.
func Reserved(name string) bool { return reserved[name] }

// ValidDeviceName checks a device name against the grammar above.
func ValidDeviceName(name string) error {
	switch {
	case !isSlug(name, MaxDeviceName):
		return fmt.Errorf("%w: device name %q is not a DNS-safe slug (1-%d of a-z, 0-9, inner '-')", ErrBadName, name, MaxDeviceName)
	case strings.HasPrefix(name, "xn--"):
		return fmt.Errorf("%w: device name %q starts with xn-- (internationalised names are not allowed: they can look like other names)", ErrBadName, name)
	case strings.Contains(name, "--"):
		return fmt.Errorf("%w: device name %q has \"--\" (kept for the suffix of a hostname whose natural name is taken)", ErrBadName, name)
	case reserved[name]:
		return fmt.Errorf("%w: device name %q is reserved", ErrBadName, name)
	}
	return nil
}

// ValidServiceName checks a service name against the grammar above.
func ValidServiceName(name string) error {
	if !isSlug(name, MaxServiceName) || strings.Contains(name, "-") {
		return fmt.Errorf("%w: service name %q is not 1-%d of a-z, 0-9 (no '-': a public hostname is SERVICE-DEVICE)", ErrBadName, name, MaxServiceName)
	}
	return nil
}

// LegacyServiceName reports whether name is a service name of the older
// grammar, with '-', that ValidServiceName refuses: it keeps a lease it
// already holds.
func LegacyServiceName(name string) bool {
	return ValidServiceName(name) != nil && isSlug(name, MaxServiceName) && !strings.HasPrefix(name, "xn--")
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
