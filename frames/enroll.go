package frames

// EnrollPath is the relay's HTTPS endpoint for enrollment.
const EnrollPath = "/_tether/enroll"

// ConnectPath is the relay's WebSocket endpoint for agent sessions.
const ConnectPath = "/_tether/connect"

// EnrollRequest is the JSON body an agent POSTs to EnrollPath.
type EnrollRequest struct {
	Token string `json:"token"`
	EnrollDevice
}

// EnrollDevice describes the device asking to enroll: the part of the
// request the relay passes on to the control plane as it is (the token
// travels on as its hash).
type EnrollDevice struct {
	PublicKey     []byte `json:"public_key"` // 32-byte ed25519 key, base64 in JSON
	Name          string `json:"name"`
	NameIsDefault bool   `json:"name_is_default,omitempty"` // the name is the hostname: suffix it on a clash instead of refusing
	AgentVersion  string `json:"agent_version,omitempty"`
}

// EnrollResponse is the JSON answer to a successful enrollment.
type EnrollResponse struct {
	DeviceID string `json:"device_id"`
	Name     string `json:"name"`
}

// HTTPError is the JSON body of every error answer of the relay's HTTP endpoints.
type HTTPError struct {
	Error string `json:"error"`
}
