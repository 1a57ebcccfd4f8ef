package controlplane

import "github.com/tetherfleet/tether/frames"

// NATS subjects of the control plane's request/reply service and its events.
const (
	SubjectPrefix     = "tether.cp."
	SubjectEnroll     = SubjectPrefix + "enroll"
	SubjectConnect    = SubjectPrefix + "connect"
	SubjectRegister   = SubjectPrefix + "register"
	SubjectDisconnect = SubjectPrefix + "disconnect"
	SubjectLookup     = SubjectPrefix + "lookup"
	SubjectResetRelay = SubjectPrefix + "reset-relay"

	// SubjectEvents carries DeviceEvent, published by the control plane.
	SubjectEvents = "tether.events.device"
)

// EnrollRequest asks to enroll a public key: the agent's request as it
// reached the relay (one schema, in package frames).
type EnrollRequest = frames.EnrollRequest

// EnrollResponse answers EnrollRequest.
type EnrollResponse = frames.EnrollResponse

// ConnectRequest asks to open a session for an authenticated key. The relay
// has verified the key's signature of its challenge before asking.
type ConnectRequest struct {
	PublicKey    []byte `json:"public_key"`
	RelayID      string `json:"relay_id"`
	AgentVersion string `json:"agent_version,omitempty"`
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
	EventRevoked = "revoked" // the device was revoked: cut it off
	EventSession = "session" // a new session started: older generations end
)

// DeviceEvent is published on SubjectEvents.
type DeviceEvent struct {
	Kind       string `json:"kind"`
	DeviceID   string `json:"device_id"`
	Generation uint64 `json:"generation,omitempty"`
	RelayID    string `json:"relay_id,omitempty"`
}
