// Package frames defines the Tether agent↔relay wire protocol: the control
// messages exchanged on an agent's control stream and the header that starts
// every data stream, with their binary encoding and limits.
//
// # Framing
//
// Every message is one frame: a fixed five-byte header, then the payload.
//
//	+------+---------------------------+-------------------+
//	| type | payload length (uint32 BE) | payload (length)  |
//	+------+---------------------------+-------------------+
//	  1 B            4 B                  ≤ MaxPayload B
//
// The length is checked against the reader's limit before anything is
// allocated. Inside a payload, integers are big-endian, a string is a uint16
// byte length followed by that many bytes (UTF-8), and fixed-size keys and
// signatures are raw bytes. A reader ignores bytes after the fields it knows
// (so later versions may append fields) and skips frames of unknown type
// (so later versions may add messages). See spec.md for each message.
//
// The protocol version is not in the frames: it is negotiated as the
// WebSocket subprotocol ([Subprotocol]) before any frame is sent.
package frames

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Subprotocol is the WebSocket subprotocol that carries this version of the
// protocol. A peer that does not offer it is refused before smux starts.
//
// Version history (never renumber, only append):
//   - tether.v1: first version (hello/challenge/auth, register, leases,
//     heartbeat, drain, error; stream open/accept/refuse).
const Subprotocol = "tether.v1"

// HeaderLen is the size of a frame header: type (1 byte) + length (4 bytes).
const HeaderLen = 5

// MaxPayload is the largest payload this version sends or accepts on any
// stream. Readers may pass a smaller limit.
const MaxPayload = 64 << 10

// MaxPreAuthPayload is the largest payload of Hello and Auth, the frames
// an agent sends before it is authenticated. A relay reads them with this
// limit, and its smux session takes no longer data frame from a peer it
// does not trust yet (wsmux.Config.PreAuthWindow is above it).
const MaxPreAuthPayload = 1 << 10

// Type identifies a message. Values are frozen on the wire.
type Type uint8

// Control-stream messages. The agent opens the control stream first.
const (
	// TypeHello (agent→relay) opens the handshake: public key, agent
	// version, heartbeat interval.
	TypeHello Type = 1
	// TypeChallenge (relay→agent) carries a fresh nonce and the relay's ID
	// for the agent to sign.
	TypeChallenge Type = 2
	// TypeAuth (agent→relay) carries the ed25519 signature of AuthMessage.
	TypeAuth Type = 3
	// TypeWelcome (relay→agent) says the handshake succeeded: device ID,
	// device name and the session's generation.
	TypeWelcome Type = 4
	// TypeRegister (agent→relay) lists the agent's services (name, proto),
	// then, if any asks for one, their idle timeouts in seconds.
	TypeRegister Type = 5
	// TypeLeases (relay→agent) lists the public names leased to each service.
	TypeLeases Type = 6
	// TypeHeartbeat (agent→relay) is the liveness probe, with the agent's
	// figures.
	TypeHeartbeat Type = 7
	// TypeHeartbeatAck (relay→agent) answers a heartbeat with its sequence.
	TypeHeartbeatAck Type = 8
	// TypeDrain (relay→agent) asks the agent to connect again (elsewhere)
	// and to move off this session once the new one is up.
	TypeDrain Type = 9
	// TypeError (either way) carries a code and a message; the sender closes
	// the session after it.
	TypeError Type = 10
	// TypeUpdateOffer (relay→agent) offers a signed agent release: version,
	// manifest and its minisign signature.
	TypeUpdateOffer Type = 11
	// TypeUpdateStatus (agent→relay) reports an update's progress: version,
	// state, reason.
	TypeUpdateStatus Type = 12
)

// Data-stream messages. The relay opens one stream per public connection.
const (
	// TypeStreamOpen (relay→agent) is the first frame of a data stream:
	// service name and public client address.
	TypeStreamOpen Type = 32
	// TypeStreamAccept (agent→relay): the local service was dialled; bytes
	// follow in both directions.
	TypeStreamAccept Type = 33
	// TypeStreamRefuse (agent→relay): the agent will not serve the stream;
	// a code and a reason follow and the stream is closed.
	TypeStreamRefuse Type = 34
	// TypePeerOpen (relay→relay) is the first frame of a stream between two
	// relays of a cluster: device ID, service name and public client
	// address. The holding relay answers as an agent does (stream-accept or
	// stream-refuse, passed on from the agent or its own).
	TypePeerOpen Type = 35
	// TypeFetch (agent→relay) is the first frame of a stream the agent opens
	// to download a release file from an offset: version, arch, offset.
	TypeFetch Type = 36
)

// Errors returned by the decoders.
var (
	// ErrTooLarge means a frame's declared length exceeds the reader's limit.
	ErrTooLarge = errors.New("frames: frame exceeds size limit")
	// ErrShort means a payload ended before a field it must contain.
	ErrShort = errors.New("frames: payload too short")
	// ErrInvalid means a field holds a value the protocol forbids.
	ErrInvalid = errors.New("frames: invalid field")
)

// Message is one decoded frame. The concrete types are the exported structs
// of this package; Unknown stands for a type this version does not know.
type Message interface {
	// Type is the frame type of the message.
	Type() Type
	// AppendPayload appends the encoded payload (without header) to b.
	AppendPayload(b []byte) []byte
	// parse decodes the payload into the receiver.
	parse(p []byte) error
}

// Append appends m as a complete frame (header and payload) to b.
func Append(b []byte, m Message) []byte {
	start := len(b)
	b = append(b, byte(m.Type()), 0, 0, 0, 0)
	b = m.AppendPayload(b)
	binary.BigEndian.PutUint32(b[start+1:], uint32(len(b)-start-HeaderLen))
	return b
}

// Write writes m as one frame with a single Write call.
func Write(w io.Writer, m Message) error {
	b := Append(make([]byte, 0, 64), m)
	if len(b)-HeaderLen > MaxPayload {
		return fmt.Errorf("write %v: %w", m.Type(), ErrTooLarge)
	}
	_, err := w.Write(b)
	return err
}

// DeadlineWriter is a stream with a write deadline (net.Conn, smux.Stream).
type DeadlineWriter interface {
	io.Writer
	SetWriteDeadline(t time.Time) error
}

// WriteTimeout writes m as one frame under a write deadline of d from now,
// then clears the deadline. Every control and stream-header write of the
// agent and the relay goes through it, so a peer that stops reading cannot
// hold a writer for ever.
func WriteTimeout(w DeadlineWriter, m Message, d time.Duration) error {
	w.SetWriteDeadline(time.Now().Add(d))
	defer w.SetWriteDeadline(time.Time{})
	return Write(w, m)
}

// ParseHeader decodes a frame header. It never allocates.
func ParseHeader(h [HeaderLen]byte) (Type, uint32) {
	return Type(h[0]), binary.BigEndian.Uint32(h[1:])
}

// Read reads one frame from r and decodes it. A frame longer than limit
// (MaxPayload when limit ≤ 0) yields ErrTooLarge before its payload is read or
// allocated. A frame of unknown type is returned as *Unknown, its payload
// consumed.
func Read(r io.Reader, limit int) (Message, error) {
	if limit <= 0 || limit > MaxPayload {
		limit = MaxPayload
	}
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	t, n := ParseHeader(h)
	if n > uint32(limit) {
		return nil, fmt.Errorf("%v frame of %d bytes (limit %d): %w", t, n, limit, ErrTooLarge)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("read %v payload: %w", t, err)
	}
	return Parse(t, p)
}

// Parse decodes a payload of type t. Unknown types yield *Unknown and no
// error; trailing bytes after the known fields are ignored.
func Parse(t Type, p []byte) (Message, error) {
	m := newMessage(t)
	if err := m.parse(p); err != nil {
		return nil, fmt.Errorf("parse %v: %w", t, err)
	}
	return m, nil
}

func newMessage(t Type) Message {
	switch t {
	case TypeHello:
		return new(Hello)
	case TypeChallenge:
		return new(Challenge)
	case TypeAuth:
		return new(Auth)
	case TypeWelcome:
		return new(Welcome)
	case TypeRegister:
		return new(Register)
	case TypeLeases:
		return new(Leases)
	case TypeHeartbeat:
		return new(Heartbeat)
	case TypeHeartbeatAck:
		return new(HeartbeatAck)
	case TypeDrain:
		return new(Drain)
	case TypeError:
		return new(Error)
	case TypeStreamOpen:
		return new(StreamOpen)
	case TypeStreamAccept:
		return new(StreamAccept)
	case TypeStreamRefuse:
		return new(StreamRefuse)
	case TypePeerOpen:
		return new(PeerOpen)
	case TypeUpdateOffer:
		return new(UpdateOffer)
	case TypeUpdateStatus:
		return new(UpdateStatus)
	case TypeFetch:
		return new(Fetch)
	}
	return &Unknown{T: t}
}

var typeNames = map[Type]string{
	TypeHello: "hello", TypeChallenge: "challenge", TypeAuth: "auth",
	TypeWelcome: "welcome", TypeRegister: "register", TypeLeases: "leases",
	TypeHeartbeat: "heartbeat", TypeHeartbeatAck: "heartbeat-ack",
	TypeDrain: "drain", TypeError: "error", TypeStreamOpen: "stream-open",
	TypeStreamAccept: "stream-accept", TypeStreamRefuse: "stream-refuse",
	TypePeerOpen: "peer-open", TypeUpdateOffer: "update-offer",
	TypeUpdateStatus: "update-status", TypeFetch: "fetch",
}

func (t Type) String() string {
	if s, ok := typeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// ReadAs reads the next frame that is not of an unknown type and returns
// it as a T. An *Error frame from the peer is returned as the error (it
// implements error); any other type is an error naming it.
func ReadAs[T Message](r io.Reader, limit int) (T, error) {
	var zero T
	for {
		m, err := Read(r, limit)
		if err != nil {
			return zero, err
		}
		switch m := m.(type) {
		case T:
			return m, nil
		case *Unknown:
			continue
		case *Error:
			return zero, m
		default:
			return zero, fmt.Errorf("unexpected %v frame", m.Type())
		}
	}
}
