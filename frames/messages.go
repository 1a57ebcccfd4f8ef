package frames

import (
	"encoding/binary"
	"fmt"
)

// Limits on repeated fields and strings, checked by the decoders.
const (
	// MaxServices is the largest number of services one agent may register.
	MaxServices = 64
	// MaxString is the longest string field, in bytes.
	MaxString = 1024
	// MaxBlob is the longest byte-string field (a release manifest or its
	// signature), in bytes.
	MaxBlob = 16 << 10
	// MinIdleSeconds and MaxIdleSeconds bound a service's idle timeout
	// (Service.IdleSeconds, when not zero): 10 s to 24 h.
	MinIdleSeconds = 10
	MaxIdleSeconds = 24 * 60 * 60
)

// Hello (agent→relay) opens the handshake on the control stream.
type Hello struct {
	PublicKey       [32]byte // the device's ed25519 public key
	AgentVersion    string   // e.g. "v0.3.1"
	HeartbeatMillis uint32   // the agent's heartbeat interval; the relay declares it dead after 3
}

// Challenge (relay→agent) asks the agent to sign AuthMessage(Nonce, RelayID, key).
type Challenge struct {
	Nonce   [32]byte // fresh random bytes for this connection
	RelayID string   // the relay's name in the cluster
}

// Auth (agent→relay) proves possession of the device key.
type Auth struct {
	Signature [64]byte // ed25519 signature of AuthMessage
}

// Welcome (relay→agent) ends a successful handshake.
type Welcome struct {
	DeviceID   string // derived from the public key (see DeviceID)
	DeviceName string // the device's DNS-safe name in the fleet
	Generation uint64 // this session's generation; the newest session of a device wins
	// HeartbeatMillis is the heartbeat interval the relay holds the agent
	// to: the agent's own, clamped to the relay's bounds. Zero (a relay
	// that predates the field) means the agent's own.
	HeartbeatMillis uint32
}

// Service names one local service of the agent. Its local address never
// leaves the device.
type Service struct {
	Name  string // DNS-safe service name, e.g. "web"
	Proto string // "http" or "tcp"
	// IdleSeconds asks the relay to close a public connection to a tcp
	// service after this many seconds without a byte either way. Zero
	// means none asked (the relay's own setting applies); relays clamp
	// other values to MinIdleSeconds..MaxIdleSeconds and ignore it for
	// http services.
	IdleSeconds uint32
}

// Register (agent→relay) lists the services the agent serves. The idle
// seconds of the services travel after the list, as a second list of the
// same length, and only when one of them is not zero: a Register without
// them (an older agent's) reads as all zero, and an older relay ignores
// them.
type Register struct {
	Services []Service
}

// Lease is a public name bound to one service of the device.
type Lease struct {
	Service  string
	Proto    string
	Hostname string // full public hostname for http services, else empty
	Port     uint16 // public TCP port for tcp services, else 0
}

// Leases (relay→agent) answers Register with the names leased to each service.
type Leases struct {
	Leases []Lease
}

// Heartbeat (agent→relay) is the one liveness probe of a session; it carries
// the agent's figures so the agent needs no metrics endpoint of its own.
type Heartbeat struct {
	Seq           uint64 // increments by one per heartbeat
	ActiveStreams uint32 // data streams open now
	TotalStreams  uint64 // data streams served since the agent started
}

// HeartbeatAck (relay→agent) answers the heartbeat with the same Seq.
type HeartbeatAck struct {
	Seq uint64
}

// Drain (relay→agent) asks the agent to open a new session (to this relay's
// peers) within WithinMillis and to close this one once the new one is up.
type Drain struct {
	Reason       string
	WithinMillis uint32
}

// ErrorCode classifies an Error or a StreamRefuse. Values are frozen.
type ErrorCode uint16

// Error codes.
const (
	CodeBadRequest     ErrorCode = 1  // malformed or unexpected frame
	CodeUnauthorized   ErrorCode = 2  // unknown key or bad signature
	CodeRevoked        ErrorCode = 3  // the device was revoked; do not reconnect
	CodeSuperseded     ErrorCode = 4  // a newer session of the device took over
	CodeInternal       ErrorCode = 5  // the relay failed; retry later
	CodeUnavailable    ErrorCode = 6  // the control plane is unreachable; retry later
	CodeConflict       ErrorCode = 7  // the key is live elsewhere (cloned device key?)
	CodeTooManyStreams ErrorCode = 8  // stream cap reached
	CodeUnknownService ErrorCode = 9  // no such registered service
	CodeDialFailed     ErrorCode = 10 // the local service could not be reached
	CodeNotHere        ErrorCode = 11 // (relay→relay) the relay does not hold the device; try another
)

var codeNames = map[ErrorCode]string{
	CodeBadRequest: "bad request", CodeUnauthorized: "unauthorized",
	CodeRevoked: "revoked", CodeSuperseded: "superseded", CodeInternal: "internal error",
	CodeUnavailable: "unavailable", CodeConflict: "conflict",
	CodeTooManyStreams: "too many streams", CodeUnknownService: "unknown service",
	CodeDialFailed: "local service unreachable", CodeNotHere: "not here",
}

func (c ErrorCode) String() string {
	if s, ok := codeNames[c]; ok {
		return s
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// Error carries a failure; the sender closes the session after it.
type Error struct {
	Code    ErrorCode
	Message string
}

// Error makes *Error usable as a Go error.
func (e *Error) Error() string { return e.Code.String() + ": " + e.Message }

// StreamOpen (relay→agent) starts a data stream.
type StreamOpen struct {
	Service    string // registered service name
	ClientAddr string // public client's address, "ip:port"
}

// StreamAccept (agent→relay) says bytes may flow.
type StreamAccept struct{}

// StreamRefuse (agent→relay) says why a stream will not be served.
type StreamRefuse struct {
	Code    ErrorCode
	Message string
}

// Error makes *StreamRefuse usable as a Go error.
func (e *StreamRefuse) Error() string { return e.Code.String() + ": " + e.Message }

// PeerOpen (relay→relay) starts a stream between two relays of a cluster:
// the relay that took the public connection asks the relay holding the
// device's session to carry it on to the agent.
type PeerOpen struct {
	DeviceID   string // the device whose agent serves the stream (see DeviceID)
	Service    string // registered service name, as in StreamOpen
	ClientAddr string // public client's address, "ip:port", as in StreamOpen
}

// UpdateOffer (relay→agent, control stream) offers a signed agent release.
// The agent verifies the signature with its own release keys and answers
// with UpdateStatus frames; an offer it does not trust changes nothing.
type UpdateOffer struct {
	Version   string // the release's version, e.g. "v1.4.0"
	Manifest  []byte // the release manifest exactly as signed (JSON)
	Signature []byte // the manifest's minisign signature file
}

// Update states reported in UpdateStatus.State.
const (
	UpdateDownloading = "downloading" // the binary is being fetched
	UpdateApplied     = "applied"     // swapped in; the new version is starting
	UpdateHealthy     = "healthy"     // the new version connected and passed its heartbeats
	UpdateRolledBack  = "rolled-back" // the new version failed; the previous one runs again
	UpdateFailed      = "failed"      // nothing changed: download or verification failed
	UpdateRefused     = "refused"     // nothing changed: the offer is untrusted, a downgrade or below the floor
)

// UpdateStatus (agent→relay, control stream) reports an update's progress.
type UpdateStatus struct {
	Version string // the release the status is about
	State   string // one of the Update* states
	Reason  string // why, for rolled-back, failed and refused
}

// Fetch (agent→relay) is the first frame of a stream the agent opens to
// download the release binary for its architecture. The relay answers
// StreamAccept followed by the file's bytes from Offset to its end, then
// closes the stream; or StreamRefuse.
type Fetch struct {
	Version string // the release's version
	Arch    string // the manifest's architecture key, e.g. "arm64", "armv7"
	Offset  uint64 // where to resume, in bytes
}

// Unknown is a frame of a type this version does not know. Receivers skip it.
type Unknown struct {
	T       Type
	Payload []byte
}

func (*Hello) Type() Type        { return TypeHello }
func (*Challenge) Type() Type    { return TypeChallenge }
func (*Auth) Type() Type         { return TypeAuth }
func (*Welcome) Type() Type      { return TypeWelcome }
func (*Register) Type() Type     { return TypeRegister }
func (*Leases) Type() Type       { return TypeLeases }
func (*Heartbeat) Type() Type    { return TypeHeartbeat }
func (*HeartbeatAck) Type() Type { return TypeHeartbeatAck }
func (*Drain) Type() Type        { return TypeDrain }
func (*Error) Type() Type        { return TypeError }
func (*StreamOpen) Type() Type   { return TypeStreamOpen }
func (*StreamAccept) Type() Type { return TypeStreamAccept }
func (*StreamRefuse) Type() Type { return TypeStreamRefuse }
func (*PeerOpen) Type() Type     { return TypePeerOpen }
func (*UpdateOffer) Type() Type  { return TypeUpdateOffer }
func (*UpdateStatus) Type() Type { return TypeUpdateStatus }
func (*Fetch) Type() Type        { return TypeFetch }
func (u *Unknown) Type() Type    { return u.T }

func (m *Hello) AppendPayload(b []byte) []byte {
	b = append(b, m.PublicKey[:]...)
	b = appendString(b, m.AgentVersion)
	return binary.BigEndian.AppendUint32(b, m.HeartbeatMillis)
}

func (m *Hello) parse(p []byte) error {
	d := decoder{p: p}
	d.bytes(m.PublicKey[:])
	m.AgentVersion = d.string()
	m.HeartbeatMillis = d.u32()
	return d.err
}

func (m *Challenge) AppendPayload(b []byte) []byte {
	b = append(b, m.Nonce[:]...)
	return appendString(b, m.RelayID)
}

func (m *Challenge) parse(p []byte) error {
	d := decoder{p: p}
	d.bytes(m.Nonce[:])
	m.RelayID = d.string()
	return d.err
}

func (m *Auth) AppendPayload(b []byte) []byte { return append(b, m.Signature[:]...) }

func (m *Auth) parse(p []byte) error {
	d := decoder{p: p}
	d.bytes(m.Signature[:])
	return d.err
}

func (m *Welcome) AppendPayload(b []byte) []byte {
	b = appendString(b, m.DeviceID)
	b = appendString(b, m.DeviceName)
	b = binary.BigEndian.AppendUint64(b, m.Generation)
	return binary.BigEndian.AppendUint32(b, m.HeartbeatMillis)
}

func (m *Welcome) parse(p []byte) error {
	d := decoder{p: p}
	m.DeviceID = d.string()
	m.DeviceName = d.string()
	m.Generation = d.u64()
	if len(d.p) >= 4 { // appended later: absent from older relays
		m.HeartbeatMillis = d.u32()
	}
	return d.err
}

func (m *Register) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Services)))
	idle := false
	for _, s := range m.Services {
		b = appendString(b, s.Name)
		b = appendString(b, s.Proto)
		idle = idle || s.IdleSeconds != 0
	}
	if !idle {
		return b
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Services)))
	for _, s := range m.Services {
		b = binary.BigEndian.AppendUint32(b, s.IdleSeconds)
	}
	return b
}

func (m *Register) parse(p []byte) error {
	d := decoder{p: p}
	n := d.count(MaxServices)
	for i := 0; i < n && d.err == nil; i++ {
		m.Services = append(m.Services, Service{Name: d.string(), Proto: d.string()})
	}
	if d.err != nil || len(d.p) == 0 {
		return d.err // no idle seconds: an older agent's
	}
	if k := d.count(MaxServices); d.err == nil && k != len(m.Services) {
		return fmt.Errorf("%d idle timeouts for %d services: %w", k, len(m.Services), ErrInvalid)
	}
	for i := 0; i < len(m.Services) && d.err == nil; i++ {
		m.Services[i].IdleSeconds = d.u32()
	}
	return d.err
}

func (m *Leases) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Leases)))
	for _, l := range m.Leases {
		b = appendString(b, l.Service)
		b = appendString(b, l.Proto)
		b = appendString(b, l.Hostname)
		b = binary.BigEndian.AppendUint16(b, l.Port)
	}
	return b
}

func (m *Leases) parse(p []byte) error {
	d := decoder{p: p}
	n := d.count(MaxServices)
	for i := 0; i < n && d.err == nil; i++ {
		m.Leases = append(m.Leases, Lease{Service: d.string(), Proto: d.string(), Hostname: d.string(), Port: d.u16()})
	}
	return d.err
}

func (m *Heartbeat) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = binary.BigEndian.AppendUint32(b, m.ActiveStreams)
	return binary.BigEndian.AppendUint64(b, m.TotalStreams)
}

func (m *Heartbeat) parse(p []byte) error {
	d := decoder{p: p}
	m.Seq = d.u64()
	m.ActiveStreams = d.u32()
	m.TotalStreams = d.u64()
	return d.err
}

func (m *HeartbeatAck) AppendPayload(b []byte) []byte { return binary.BigEndian.AppendUint64(b, m.Seq) }

func (m *HeartbeatAck) parse(p []byte) error {
	d := decoder{p: p}
	m.Seq = d.u64()
	return d.err
}

func (m *Drain) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Reason)
	return binary.BigEndian.AppendUint32(b, m.WithinMillis)
}

func (m *Drain) parse(p []byte) error {
	d := decoder{p: p}
	m.Reason = d.string()
	m.WithinMillis = d.u32()
	return d.err
}

func (m *Error) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(m.Code))
	return appendString(b, m.Message)
}

func (m *Error) parse(p []byte) error {
	d := decoder{p: p}
	m.Code = ErrorCode(d.u16())
	m.Message = d.string()
	return d.err
}

func (m *StreamOpen) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Service)
	return appendString(b, m.ClientAddr)
}

func (m *StreamOpen) parse(p []byte) error {
	d := decoder{p: p}
	m.Service = d.string()
	m.ClientAddr = d.string()
	return d.err
}

func (m *StreamAccept) AppendPayload(b []byte) []byte { return b }
func (m *StreamAccept) parse([]byte) error            { return nil }

func (m *StreamRefuse) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(m.Code))
	return appendString(b, m.Message)
}

func (m *StreamRefuse) parse(p []byte) error {
	d := decoder{p: p}
	m.Code = ErrorCode(d.u16())
	m.Message = d.string()
	return d.err
}

func (m *PeerOpen) AppendPayload(b []byte) []byte {
	b = appendString(b, m.DeviceID)
	b = appendString(b, m.Service)
	return appendString(b, m.ClientAddr)
}

func (m *PeerOpen) parse(p []byte) error {
	d := decoder{p: p}
	m.DeviceID = d.string()
	m.Service = d.string()
	m.ClientAddr = d.string()
	return d.err
}

func (m *UpdateOffer) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Version)
	b = appendBlob(b, m.Manifest)
	return appendBlob(b, m.Signature)
}

func (m *UpdateOffer) parse(p []byte) error {
	d := decoder{p: p}
	m.Version = d.string()
	m.Manifest = d.blob()
	m.Signature = d.blob()
	return d.err
}

func (m *UpdateStatus) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Version)
	b = appendString(b, m.State)
	return appendString(b, m.Reason)
}

func (m *UpdateStatus) parse(p []byte) error {
	d := decoder{p: p}
	m.Version = d.string()
	m.State = d.string()
	m.Reason = d.string()
	return d.err
}

func (m *Fetch) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Version)
	b = appendString(b, m.Arch)
	return binary.BigEndian.AppendUint64(b, m.Offset)
}

func (m *Fetch) parse(p []byte) error {
	d := decoder{p: p}
	m.Version = d.string()
	m.Arch = d.string()
	m.Offset = d.u64()
	return d.err
}

func (m *Unknown) AppendPayload(b []byte) []byte { return append(b, m.Payload...) }
func (m *Unknown) parse(p []byte) error          { m.Payload = p; return nil }

// appendString appends s as uint16 length + bytes, truncated to MaxString so
// that what is written can always be read back.
func appendString(b []byte, s string) []byte {
	if len(s) > MaxString {
		s = s[:MaxString]
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// appendBlob appends p as uint16 length + bytes, truncated to MaxBlob so
// that what is written can always be read back.
func appendBlob(b, p []byte) []byte {
	if len(p) > MaxBlob {
		p = p[:MaxBlob]
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
	return append(b, p...)
}

// decoder reads fields from a payload; the first failure sticks in err and
// later reads return zero values.
type decoder struct {
	p   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.p) < n {
		d.err = ErrShort
		return nil
	}
	v := d.p[:n]
	d.p = d.p[n:]
	return v
}

func (d *decoder) bytes(dst []byte) { copy(dst, d.take(len(dst))) }

func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *decoder) string() string {
	n := int(d.u16())
	if d.err == nil && n > MaxString {
		d.err = fmt.Errorf("string of %d bytes: %w", n, ErrInvalid)
		return ""
	}
	return string(d.take(n))
}

func (d *decoder) blob() []byte {
	n := int(d.u16())
	if d.err == nil && n > MaxBlob {
		d.err = fmt.Errorf("byte string of %d bytes: %w", n, ErrInvalid)
		return nil
	}
	v := d.take(n)
	if v == nil {
		return nil
	}
	return append([]byte(nil), v...)
}

func (d *decoder) count(max int) int {
	n := int(d.u16())
	if d.err == nil && n > max {
		d.err = fmt.Errorf("%d entries (max %d): %w", n, max, ErrInvalid)
		return 0
	}
	return n
}
