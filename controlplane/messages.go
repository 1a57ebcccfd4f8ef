package controlplane

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/tetherfleet/tether/frames"
)

// NATS subjects of the control plane's request/reply service, its events
// and its requests to relays. relay/cluster.md describes the protocol and
// relay/deploy/nats.conf grants each role its subjects.
const (
	SubjectPrefix     = "tether.cp."
	SubjectEnroll     = SubjectPrefix + "enroll"
	SubjectConnect    = SubjectPrefix + "connect"
	SubjectRegister   = SubjectPrefix + "register"
	SubjectDisconnect = SubjectPrefix + "disconnect"
	SubjectLookup     = SubjectPrefix + "lookup"
	SubjectResetRelay = SubjectPrefix + "reset-relay"
	SubjectSnapshot   = SubjectPrefix + "snapshot" // SnapshotRequest → SnapshotResponse
	SubjectHello      = SubjectPrefix + "hello"    // HelloRequest → HelloResponse, every HelloInterval
	SubjectSync       = SubjectPrefix + "sync"     // SyncRequest → SyncResponse
	SubjectCert       = SubjectPrefix + "cert"     // CertRequest → CertResponse
	// SubjectClaim carries a starting control plane's Claim; only control
	// planes publish and subscribe it.
	SubjectClaim = SubjectPrefix + "claim"

	// SubjectEvents carries DeviceEvent, published by the control plane.
	SubjectEvents = "tether.events.device"

	// SubjectRelayPrefix starts the subjects of requests to one relay:
	// RelaySubject(id, op).
	SubjectRelayPrefix = "tether.relay."
	// RelayOpRevoke asks a relay to apply a revocation (RevokeNotice) and
	// answers once it has.
	RelayOpRevoke = "revoke"

	// Inbox prefixes, one per role, so each role subscribes only to its
	// own replies.
	InboxControlPlane = "_INBOX_cp"
	InboxRelay        = "_INBOX_relay"
)

// RelaySubject is the subject of request op to relay id.
func RelaySubject(id, op string) string { return SubjectRelayPrefix + id + "." + op }

// HelloInterval is how often a relay says hello; a relay silent for three
// intervals is down.
const HelloInterval = 5 * time.Second

// TokenHash is what the control plane stores of an enrollment token, and
// the only form in which a token crosses NATS: hex SHA-256.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// EnrollRequest asks to enroll a public key: the agent's request as it
// reached the relay, with the token replaced by its hash.
type EnrollRequest struct {
	TokenHash string `json:"token_hash"`
	frames.EnrollDevice
}

// EnrollResponse answers EnrollRequest.
type EnrollResponse = frames.EnrollResponse

// ConnectRequest asks to open a session for a key. It carries the agent's
// signature of the relay's challenge, which the control plane verifies
// again (frames.VerifyAuth) and whose nonce it accepts once: holding relay
// credentials is not enough to open a session for a device.
type ConnectRequest struct {
	PublicKey    []byte   `json:"public_key"`
	RelayID      string   `json:"relay_id"`
	AgentVersion string   `json:"agent_version,omitempty"`
	Nonce        [32]byte `json:"nonce"`
	Signature    [64]byte `json:"signature"`
}

// ConnectResponse answers ConnectRequest.
type ConnectResponse struct {
	DeviceID   string `json:"device_id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"`
}

// RegisterRequest records a session's services.
type RegisterRequest struct {
	DeviceID   string    `json:"device_id"`
	Generation uint64    `json:"generation"`
	Services   []Service `json:"services"`
}

// DisconnectRequest ends a session.
type DisconnectRequest struct {
	DeviceID   string `json:"device_id"`
	Generation uint64 `json:"generation"`
}

// LookupRequest asks for the lease of a hostname label or a port.
type LookupRequest struct {
	Hostname string `json:"hostname,omitempty"`
	Port     uint16 `json:"port,omitempty"`
}

// Event kinds.
const (
	EventEnrolled  = "enrolled"   // a new device: Device holds its record
	EventRevoked   = "revoked"    // the device was revoked: cut it off
	EventSession   = "session"    // a new session started on RelayID: older generations end
	EventOffline   = "offline"    // the session of Generation ended
	EventLeases    = "leases"     // the device's leases changed: Leases holds them all
	EventDeleted   = "deleted"    // the device was deleted (or replaced): forget it and its leases
	EventRelayDown = "relay-down" // every session of RelayID ended (it restarted or fell silent)
)

// DeviceEvent is published on SubjectEvents. Epoch is random per start of
// the control plane and Seq counts its events from 1: a relay that sees a
// new epoch or a gap takes a new snapshot.
type DeviceEvent struct {
	Epoch      string        `json:"epoch"`
	Seq        uint64        `json:"seq"`
	Kind       string        `json:"kind"`
	DeviceID   string        `json:"device_id,omitempty"`
	Generation uint64        `json:"generation,omitempty"`
	RelayID    string        `json:"relay_id,omitempty"`
	Device     *DeviceRecord `json:"device,omitempty"` // EventEnrolled
	Leases     []Lease       `json:"leases,omitempty"` // EventLeases
}

// DeviceRecord is what a relay keeps of a device to serve it: identity,
// revocation, names and presence.
type DeviceRecord struct {
	ID         string  `json:"id"`
	Name       string  `json:"name"`
	PublicKey  []byte  `json:"public_key"`
	Revoked    bool    `json:"revoked,omitempty"`
	Leases     []Lease `json:"leases,omitempty"`
	Online     bool    `json:"online,omitempty"`
	Relay      string  `json:"relay,omitempty"`
	Generation uint64  `json:"generation,omitempty"`
}

// SnapshotRequest asks for a page of device records, ordered by ID,
// starting after After. Limit zero means 500.
type SnapshotRequest struct {
	After string `json:"after,omitempty"`
	Limit int    `json:"limit,omitempty"`
}

// SnapshotResponse is a page of the state as of event Seq of Epoch. Next
// is empty on the last page.
type SnapshotResponse struct {
	Epoch   string         `json:"epoch"`
	Seq     uint64         `json:"seq"`
	Devices []DeviceRecord `json:"devices"`
	Next    string         `json:"next,omitempty"`
}

// HelloRequest is a relay's periodic announcement.
type HelloRequest struct {
	RelayID     string   `json:"relay_id"`
	ClusterAddr string   `json:"cluster_addr"`           // where peers reach it
	PublicNames []string `json:"public_names,omitempty"` // its own hostnames: never leased
	// ReservedLabels are the hostname labels its public names take under
	// its domain ("relay-1" for relay-1.example.com): never leased.
	ReservedLabels []string `json:"reserved_labels,omitempty"`
	Sessions       int      `json:"sessions"`
	UnboundPorts   []uint16 `json:"unbound_ports,omitempty"` // leased ports it could not bind
	// BusyPorts are unleased ports of the range that another process of
	// its host holds: none is leased while a live relay reports it.
	BusyPorts []uint16 `json:"busy_ports,omitempty"`
}

// HelloResponse lists the live relays (the asker too).
type HelloResponse struct {
	Epoch  string      `json:"epoch"`
	Seq    uint64      `json:"seq"`
	Relays []RelayInfo `json:"relays"`
}

// RelayInfo is a live relay as the control plane sees it.
type RelayInfo struct {
	ID           string    `json:"id"`
	ClusterAddr  string    `json:"cluster_addr"`
	PublicNames  []string  `json:"public_names,omitempty"`
	Sessions     int       `json:"sessions"`
	UnboundPorts []uint16  `json:"unbound_ports,omitempty"`
	BusyPorts    []uint16  `json:"busy_ports,omitempty"`
	LastSeen     time.Time `json:"last_seen"`
}

// SyncRequest reports the sessions a relay holds after the control plane
// was unreachable; everything else marked online on that relay is offline.
type SyncRequest struct {
	RelayID  string        `json:"relay_id"`
	Sessions []SyncSession `json:"sessions"`
}

// SyncSession is one session held by a relay.
type SyncSession struct {
	DeviceID   string `json:"device_id"`
	Generation uint64 `json:"generation"`
}

// SyncResponse lists the sessions the control plane accepted, with the
// generation each now has; a session left out was superseded or revoked
// and the relay closes it.
type SyncResponse struct {
	Sessions []SyncSession `json:"sessions"`
}

// Certificate kinds a relay asks for.
const (
	CertPeer         = "peer"         // a leaf for relay-to-relay TLS, issued by the root
	CertIntermediate = "intermediate" // a CA for the relay's public certificates, name-constrained
)

// CertRequest asks the cluster CA to certify a key the relay made.
type CertRequest struct {
	RelayID   string   `json:"relay_id"`
	Kind      string   `json:"kind"`
	PublicKey []byte   `json:"public_key"`      // PKIX DER
	Hosts     []string `json:"hosts,omitempty"` // names and addresses (intermediate: the permitted ones)
}

// CertResponse holds the certificate (DER) and the root it chains to.
type CertResponse struct {
	Cert []byte `json:"cert"`
	Root []byte `json:"root"`
}

// Claim is a starting control plane's announcement on SubjectClaim.
type Claim struct {
	Instance string    `json:"instance"` // random per start
	Host     string    `json:"host"`
	Started  time.Time `json:"started"`
	Active   bool      `json:"active"` // an answer from the control plane that serves
}

// RevokeNotice asks a relay to apply a revocation now.
type RevokeNotice struct {
	DeviceID string `json:"device_id"`
}

// RevokeResult is the outcome of a revocation: which live relays confirmed
// they cut the device off, and which did not (yet).
type RevokeResult struct {
	Device    Device   `json:"device"`
	Confirmed []string `json:"confirmed"`
	Pending   []string `json:"pending"`
	// Undelivered says why no relay could be told at all (NATS is
	// unreachable); empty when every live relay was asked.
	Undelivered string `json:"undelivered,omitempty"`
}
