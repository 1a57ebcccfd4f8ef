// Package natsperm says who may do what on Tether's NATS: the two roles
// (control plane and relay), their user names and inbox prefixes, and the
// subjects each may publish and subscribe to. It is the one home of those
// rules: the embedded NATS server (natsembed) applies them as they are,
// and a test holds relay/deploy/nats.conf to them.
//
// relay/cluster.md explains why each role has each subject. In short: a
// relay cannot subscribe to the control plane's requests (so it can
// neither read enrollment requests nor answer as the control plane), and
// cannot publish events or claims (so it can forge neither a revocation
// nor a control plane). Releases need no rule of their own: relays ask on
// tether.cp.release-* (the control plane alone answers, so alone serves
// binaries and rollout plans) and hear tether.events.release (which only
// the control plane may publish); nothing on NATS publishes a release.
package natsperm

import (
	"fmt"
	"slices"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/tetherfleet/tether/controlplane"
)

// MaxPayload is the largest NATS message Tether needs: a relay's sync
// lists every session it holds (some 60 bytes each). NATS servers of a
// Tether cluster set max_payload to it.
const MaxPayload = 8 << 20

// Role is a kind of NATS client in a Tether cluster. Its string is the
// NATS user name it connects as.
type Role string

// The roles.
const (
	ControlPlane Role = "controlplane"
	Relay        Role = "relay"
)

// Roles lists every role.
var Roles = []Role{ControlPlane, Relay}

// User is the NATS user name of the role.
func (r Role) User() string { return string(r) }

// InboxPrefix is the prefix of the role's request/reply inboxes: each
// role subscribes only to its own replies.
func (r Role) InboxPrefix() string {
	if r == ControlPlane {
		return controlplane.InboxControlPlane
	}
	return controlplane.InboxRelay
}

// Valid reports an unknown role as an error.
func (r Role) Valid() error {
	if !slices.Contains(Roles, r) {
		return fmt.Errorf("unknown NATS role %q (want %q or %q)", r, ControlPlane, Relay)
	}
	return nil
}

// Rules are the subjects a role may use. A nil list is absent (not an
// empty allow list).
type Rules struct {
	PublishAllow   []string
	PublishDeny    []string
	SubscribeAllow []string
	// AllowResponses lets the role answer any request it received, on
	// the request's reply subject (nats-server's allow_responses).
	AllowResponses bool
}

// For returns the rules of a role; an unknown role gets none.
func For(r Role) Rules {
	switch r {
	case ControlPlane:
		return Rules{
			PublishAllow:   []string{"tether.events.>", controlplane.SubjectRelayPrefix + ">", controlplane.SubjectClaim, "$SRV.>"},
			SubscribeAllow: []string{controlplane.SubjectPrefix + ">", controlplane.InboxControlPlane + ".>", "$SRV.>"},
			AllowResponses: true,
		}
	case Relay:
		return Rules{
			PublishAllow:   []string{controlplane.SubjectPrefix + ">"},
			PublishDeny:    []string{controlplane.SubjectClaim},
			SubscribeAllow: []string{"tether.events.>", controlplane.SubjectRelayPrefix + ">", controlplane.InboxRelay + ".>"},
			AllowResponses: true,
		}
	}
	return Rules{}
}

// Permissions returns the rules of a role as nats-server's user
// permissions, exactly as nats-server reads them from a config file.
func Permissions(r Role) *server.Permissions {
	rules := For(r)
	p := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: slices.Clone(rules.PublishAllow), Deny: slices.Clone(rules.PublishDeny)},
		Subscribe: &server.SubjectPermission{Allow: slices.Clone(rules.SubscribeAllow)},
	}
	if rules.AllowResponses {
		p.Response = &server.ResponsePermission{
			MaxMsgs: server.DEFAULT_ALLOW_RESPONSE_MAX_MSGS,
			Expires: server.DEFAULT_ALLOW_RESPONSE_EXPIRATION,
		}
	}
	return p
}
