// Package controlplane is Tether's authority for identity and names: the
// domain types (devices, enrollment tokens, leases), the errors, and the
// messages that relays exchange with it over NATS.
//
// The adapters live in subpackages named after their technology: boltstore
// keeps the state in bbolt, natsapi serves it to relays over NATS (and is
// the client relays use), httpapi is the admin API behind tetherctl,
// clusterca is the cluster's certificate authority, natsperm says which
// NATS subjects each role may use, natsembed runs a NATS server in the
// process, and daemon wires them into a running control plane.
// controlplanetest runs one for tests. relay/cluster.md describes the
// protocol between relays and the control plane.
package controlplane

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/tetherfleet/tether/frames"
)

// Device is an enrolled device.
type Device struct {
	ID           string            `json:"id"` // frames.DeviceID of the public key
	Name         string            `json:"name"`
	PublicKey    []byte            `json:"public_key"`
	Labels       map[string]string `json:"labels,omitempty"` // from the enrollment token
	Revoked      bool              `json:"revoked,omitempty"`
	EnrolledAt   time.Time         `json:"enrolled_at"`
	RevokedAt    time.Time         `json:"revoked_at,omitzero"`
	TokenID      string            `json:"token_id,omitempty"` // the token that enrolled it
	Replaced     string            `json:"replaced,omitempty"` // ID of the revoked device whose name and leases it took (tetherctl device replace)
	AgentVersion string            `json:"agent_version,omitempty"`
	Services     []Service         `json:"services,omitempty"` // as last registered

	// Presence.
	Online      bool      `json:"online"`
	Relay       string    `json:"relay,omitempty"`       // relay holding the newest session
	Generation  uint64    `json:"generation"`            // of the newest session
	ConnectedAt time.Time `json:"connected_at,omitzero"` // of the newest session
	LastSeen    time.Time `json:"last_seen,omitzero"`

	// CloneSuspected is set when two live agents keep taking the key's
	// session from each other (an SD card image copied to many boards).
	CloneSuspected bool    `json:"clone_suspected,omitempty"`
	Takeovers      []int64 `json:"takeovers,omitempty"` // unix ms of recent takeovers of a live session
}

// Service is a service an agent registered.
type Service struct {
	Name  string `json:"name"`
	Proto string `json:"proto"` // "http" or "tcp"
}

// Lease binds a public name (an HTTP hostname label or a TCP port) to one
// service of one device. Leases are unique cluster-wide and sticky.
type Lease struct {
	Hostname   string    `json:"hostname,omitempty"` // DNS label, e.g. "web-pi01"; relays append their domain, the admin API shows it with the domain
	Port       uint16    `json:"port,omitempty"`
	DeviceID   string    `json:"device_id"`
	DeviceName string    `json:"device"`
	Service    string    `json:"service"`
	Proto      string    `json:"proto"`
	CreatedAt  time.Time `json:"created_at"`

	// Filled in when leases are listed or looked up.
	Relay      string `json:"relay,omitempty"`
	Online     bool   `json:"online"`
	Generation uint64 `json:"generation,omitempty"`
	// UnboundOn lists the live relays that reported this TCP lease's port
	// as one they could not bind (admin listings only).
	UnboundOn []string `json:"unbound_on,omitempty"`
}

// Token is an enrollment token as stored: only its hash is kept.
type Token struct {
	ID        string            `json:"id"` // short public identifier, safe to log
	Uses      int               `json:"uses"`
	Used      int               `json:"used"`
	ExpiresAt time.Time         `json:"expires_at"`
	Labels    map[string]string `json:"labels,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
	// Replaces is the ID of a revoked device whose name and leases the
	// device this token enrolls takes over (tetherctl device replace).
	Replaces string `json:"replaces,omitempty"`
}

// TokenPrefix starts every enrollment token so that secret scanners find leaked ones.
const TokenPrefix = "tth_"

// Protocols a service may use.
const (
	ProtoHTTP = "http"
	ProtoTCP  = "tcp"
)

// ValidDeviceName checks a device name against the grammar of package
// frames; an error is KindInvalid.
func ValidDeviceName(name string) error {
	if err := frames.ValidDeviceName(name); err != nil {
		return Errorf(KindInvalid, "%s", strings.TrimPrefix(err.Error(), frames.ErrBadName.Error()+": "))
	}
	return nil
}

// ValidService checks a service's name (the grammar of package frames) and protocol.
func ValidService(s Service) error {
	if err := frames.ValidServiceName(s.Name); err != nil {
		return Errorf(KindInvalid, "%s", strings.TrimPrefix(err.Error(), frames.ErrBadName.Error()+": "))
	}
	if s.Proto != ProtoHTTP && s.Proto != ProtoTCP {
		return Errorf(KindInvalid, "service %s: protocol %q is neither http nor tcp", s.Name, s.Proto)
	}
	return nil
}

// relayIDPattern is the grammar of a relay ID: one DNS label (it is a
// token of NATS subjects and the first label of the relay's peer name).
var relayIDPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidRelayID checks a relay ID: 1 to 63 of a-z, 0-9 and inner '-'. An
// error is KindInvalid.
func ValidRelayID(id string) error {
	if !relayIDPattern.MatchString(id) {
		return Errorf(KindInvalid, "relay ID %q is not a DNS label (1-63 of a-z, 0-9, inner '-')", id)
	}
	return nil
}

// PortRange is an inclusive range of TCP ports for leases.
type PortRange struct{ First, Last uint16 }

// ParsePortRange parses "20000-29999".
func ParsePortRange(s string) (PortRange, error) {
	var r PortRange
	if _, err := fmt.Sscanf(s, "%d-%d", &r.First, &r.Last); err != nil || r.First == 0 || r.Last < r.First {
		return PortRange{}, fmt.Errorf("port range %q: want FIRST-LAST, e.g. 20000-29999", s)
	}
	return r, nil
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// Relays is the part of the control plane that relays use. boltstore
// implements it in-process; natsapi.Client implements it over NATS.
type Relays interface {
	// Enroll registers a device's public key with an enrollment token.
	Enroll(ctx context.Context, req EnrollRequest) (EnrollResponse, error)
	// Connect authorises a new session of the device with the key and
	// returns the device and the session's generation.
	Connect(ctx context.Context, req ConnectRequest) (ConnectResponse, error)
	// Register records the session's services and returns their leases.
	Register(ctx context.Context, req RegisterRequest) ([]Lease, error)
	// Disconnect ends a session; a newer session of the device is not affected.
	Disconnect(ctx context.Context, req DisconnectRequest) error
	// Lookup finds the lease of a hostname label or port.
	Lookup(ctx context.Context, req LookupRequest) (Lease, error)
	// ResetRelay marks every session held by a relay as ended (the relay
	// restarted and holds none).
	ResetRelay(ctx context.Context, relayID string) error
}

// Cluster is what a relay of a cluster uses: Relays, and the device events
// and snapshots its replica is built from, membership, recovery after the
// control plane was away, certificates and revocation notices.
// natsapi.Client implements it; relay/cluster.md describes the protocol.
type Cluster interface {
	Relays
	// Watch calls fn for every device event, in order, until ctx ends.
	Watch(ctx context.Context, fn func(DeviceEvent)) error
	// Snapshot returns a page of device records with the seq it is as of.
	Snapshot(ctx context.Context, req SnapshotRequest) (SnapshotResponse, error)
	// Hello announces the relay and lists the live relays.
	Hello(ctx context.Context, req HelloRequest) (HelloResponse, error)
	// Sync reports the sessions the relay holds after an outage.
	Sync(ctx context.Context, req SyncRequest) (SyncResponse, error)
	// Cert has the cluster CA certify a key of the relay.
	Cert(ctx context.Context, req CertRequest) (CertResponse, error)
	// ServeRevocations answers revocation notices to relay relayID.
	ServeRevocations(ctx context.Context, relayID string, apply func(context.Context, RevokeNotice) error) error
}
