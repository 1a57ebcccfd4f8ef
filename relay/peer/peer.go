// Package peer carries public connections between the relays of a cluster:
// a relay that takes a public connection for a device whose agent is held
// by another relay opens a stream to that relay, over one long-lived,
// mutually authenticated, multiplexed connection per peer, and the holding
// relay carries the stream on to the agent.
//
// # Wire
//
// TCP to the peer's cluster address, TLS 1.3 with certificates both ways
// and ALPN [Protocol], one frames.StreamAccept from the accepting relay
// (the session is accepted), then an smux v2 session on which only the
// dialling relay opens streams. Each stream starts with a frames.PeerOpen;
// the accepting relay's [Handler] answers it as an agent would
// (frames/spec.md, "Relay-to-relay streams"). Two relays that forward to
// each other thus hold two sessions, one dialled by each.
//
// # Identity
//
// A relay's peer certificate is a leaf signed by the cluster root itself,
// for server and client authentication, naming the relay as
// [DNSName](relayID). Each side verifies the other's chain against the root
// pool and refuses a chain longer than leaf and root: the intermediate CA a
// relay holds for its public names cannot mint a peer identity. The
// dialling relay also checks that the peer is the relay it meant to reach.
//
// # Bounds and liveness
//
// Open waits for a free slot when MaxStreams streams to the peer are open
// (back-pressure, until its context ends); the accepting side refuses
// streams beyond its own cap with too many streams. smux's keepalive is the
// one liveness mechanism of a session: a NOP every KeepAlive, and a session
// on which nothing arrived for three intervals is closed (a peer that went
// silent is noticed 3 to 6 intervals after its last frame, 6 to 12 s by
// default; one that closed or reset the connection at once); the next
// Open dials again.
//
// # Metrics
//
// Registered on Config.Registerer:
//
//   - tether_relay_peer_streams_total{peer,direction}: streams opened to
//     (direction "out") or accepted from ("in") each peer relay.
//   - tether_relay_peer_streams_refused_total{reason}: "cap" (a peer's
//     stream beyond MaxPeerStreams, refused), "busy" (Open gave up waiting
//     for a slot under MaxStreams), "bad_open" (a stream without a valid
//     peer-open in time).
//   - tether_relay_peer_stream_waits_total: Opens that had to wait for a
//     slot (back-pressure).
//   - tether_relay_peer_sessions{direction}: live sessions dialled ("out")
//     and accepted ("in").
//   - tether_relay_peer_dial_errors_total: failed dials to peers (TCP, TLS,
//     identity, or the peer refusing us).
//   - tether_relay_peer_handshake_errors_total: incoming connections
//     refused in the TLS handshake (not a peer of this cluster).
package peer

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/xtaci/smux"
)

// Handler serves one stream a peer opened. open is the stream's peer-open
// frame; st is the stream, positioned after it. The handler answers as an
// agent would: the agent's stream-accept or stream-refuse and then bytes
// both ways (splice st with the agent's stream), or its own
// frames.StreamRefuse (frames.CodeNotHere for a device it does not hold).
// It returns when the stream is done; st is closed after it returns. ctx
// ends when the peer's session ends or the Transport closes, and
// [FromRelay] names the peer.
type Handler func(ctx context.Context, open *frames.PeerOpen, st net.Conn)

// Config configures a Transport. Zero values of optional fields mean the
// documented defaults.
type Config struct {
	// RelayID is this relay's ID in the cluster; Cert must name it.
	// Required.
	RelayID string
	// Cert is this relay's peer certificate and key: a leaf issued by the
	// cluster root to DNSName(RelayID) for server and client
	// authentication. Required.
	Cert tls.Certificate
	// Roots holds the cluster root: a peer's leaf must be signed by one of
	// these certificates directly. Required.
	Roots *x509.CertPool
	// Handler serves the streams peers open; required by Serve, unused by
	// Open.
	Handler Handler
	// MaxStreams caps the streams this relay has open to one peer at once;
	// Open waits for a slot beyond it. Zero means 1024.
	MaxStreams int
	// MaxPeerStreams caps the streams one peer session may have open to
	// this relay at once; beyond it, streams are refused with too many
	// streams. Zero means MaxStreams plus an eighth: the margin absorbs
	// streams the peer has closed (freeing its slot) whose handler here has
	// not returned yet. Keep MaxStreams equal across the cluster.
	MaxPeerStreams int
	// KeepAlive is the smux keepalive interval: a session on which nothing
	// arrived for three intervals is closed. Zero means 2 s.
	KeepAlive time.Duration
	// HandshakeTimeout bounds dialling a peer (TCP, TLS, its acceptance),
	// an incoming handshake, and the wait for a stream's peer-open. Zero
	// means 10 s.
	HandshakeTimeout time.Duration
	// Mux tunes the smux windows. Zero StreamWindow means 512 KiB; zero
	// SessionWindow means 32 MiB here (not wsmux's 4 MiB): one session
	// carries many users' streams, and a session whose window is full of
	// unread bytes stalls all of them, so it is sized for 64 streams whose
	// readers stopped.
	Mux wsmux.Config
	// DialContext opens TCP connections to peers; nil means a net.Dialer
	// without TCP keepalives (smux's keepalive is the liveness check).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the metrics listed in the package doc; nil
	// registers nowhere.
	Registerer prometheus.Registerer
}

// Errors of Open and Serve.
var (
	// ErrClosed is returned by Open and Serve once the Transport is closed.
	ErrClosed = errors.New("peer: transport closed")
	// ErrBusy means Open waited for a free stream slot to a peer (MaxStreams
	// are open) until its context ended. It wraps the context's error too.
	ErrBusy = errors.New("peer: stream cap reached")
	// ErrIdentity means a certificate is not the peer identity expected:
	// not signed by the root itself, a CA, no or several relay names, or
	// another relay than the one dialled.
	ErrIdentity = errors.New("peer: not the expected relay identity")
)

// Transport is one relay's side of the cluster's peer connections: Serve
// accepts peers' sessions and hands their streams to the Handler; Open
// carries streams to peers over sessions it dials and keeps.
type Transport struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	smux    *smux.Config
	server  *tls.Config

	ctx    context.Context // ends at Close: bounds dials, Serve and sessions
	cancel context.CancelFunc
	wg     sync.WaitGroup // Serve calls, dials and session watchers

	mu      sync.Mutex
	closed  bool
	dialing map[net.Conn]struct{} // dialled connections in their handshake
	peers   map[string]*peerState
}

// New validates cfg and returns a Transport.
func New(cfg Config) (*Transport, error) {
	if err := validRelayID(cfg.RelayID); err != nil {
		return nil, fmt.Errorf("peer: RelayID: %w", err)
	}
	if len(cfg.Cert.Certificate) == 0 || cfg.Cert.PrivateKey == nil {
		return nil, errors.New("peer: Cert is required")
	}
	if cfg.Roots == nil {
		return nil, errors.New("peer: Roots is required")
	}
	if err := checkOwnCert(cfg.Cert, cfg.Roots, cfg.RelayID); err != nil {
		return nil, fmt.Errorf("peer: Cert: %w", err)
	}
	cfg.MaxStreams = cmp.Or(max(cfg.MaxStreams, 0), 1024)
	cfg.MaxPeerStreams = cmp.Or(max(cfg.MaxPeerStreams, 0), cfg.MaxStreams+cfg.MaxStreams/8)
	cfg.KeepAlive = cmp.Or(max(cfg.KeepAlive, 0), 2*time.Second)
	cfg.HandshakeTimeout = cmp.Or(max(cfg.HandshakeTimeout, 0), 10*time.Second)
	cfg.Mux.SessionWindow = cmp.Or(max(cfg.Mux.SessionWindow, 0), 32<<20)
	if cfg.DialContext == nil {
		cfg.DialContext = (&net.Dialer{KeepAlive: -1}).DialContext
	}
	sc := cfg.Mux.Smux()
	sc.KeepAliveDisabled = false
	sc.KeepAliveInterval = cfg.KeepAlive
	sc.KeepAliveTimeout = 3 * cfg.KeepAlive
	if err := smux.VerifyConfig(sc); err != nil {
		return nil, fmt.Errorf("peer: smux config: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Transport{
		cfg: cfg, log: log, metrics: newMetrics(cfg.Registerer), smux: sc,
		dialing: map[net.Conn]struct{}{}, peers: map[string]*peerState{},
	}
	t.server = t.serverTLS()
	t.ctx, t.cancel = context.WithCancel(context.Background())
	return t, nil
}

// Close stops every Serve (closing its listener), closes every session in
// both directions and waits for every goroutine of the Transport, handlers
// included. Streams returned by Open fail from then on; close them still.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	var sessions []*smux.Session
	for _, p := range t.peers {
		if p.sess != nil {
			sessions = append(sessions, p.sess)
		}
	}
	clear(t.peers)
	for c := range t.dialing {
		c.Close()
	}
	t.mu.Unlock()
	t.cancel() // ends Serve (its listener and sessions) and dials
	for _, s := range sessions {
		s.Close()
	}
	t.wg.Wait()
	return nil
}

// relayKey is the context key of FromRelay.
type relayKey struct{}

// FromRelay returns the ID of the peer relay whose stream a Handler
// serves, or "" for another context.
func FromRelay(ctx context.Context) string {
	id, _ := ctx.Value(relayKey{}).(string)
	return id
}

// tlsConn is the connection an smux session runs on: Close closes the TCP
// connection at once, without TLS's close_notify, whose write could wait
// up to 5 s on a peer that stopped reading.
type tlsConn struct {
	*tls.Conn
	raw net.Conn
}

func (c tlsConn) Close() error { return c.raw.Close() }

// metrics are the Transport's Prometheus collectors (see the package doc).
type metrics struct {
	streams         *prometheus.CounterVec
	refused         *prometheus.CounterVec
	waits           prometheus.Counter
	sessions        *prometheus.GaugeVec
	dialErrors      prometheus.Counter
	handshakeErrors prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_peer_streams_total",
			Help: "Streams opened to (direction out) or accepted from (in) each peer relay."}, []string{"peer", "direction"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_peer_streams_refused_total",
			Help: "Peer streams refused, by reason (cap: a peer beyond its cap; busy: Open gave up waiting for a slot; bad_open: no valid peer-open)."}, []string{"reason"}),
		waits: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_peer_stream_waits_total",
			Help: "Opens that waited for a stream slot to a peer (back-pressure)."}),
		sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tether_relay_peer_sessions",
			Help: "Live peer sessions, dialled (direction out) or accepted (in)."}, []string{"direction"}),
		dialErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_peer_dial_errors_total",
			Help: "Failed dials to peer relays (TCP, TLS, identity, or refused by the peer)."}),
		handshakeErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_peer_handshake_errors_total",
			Help: "Incoming peer connections refused in the handshake."}),
	}
	if reg != nil {
		reg.MustRegister(m.streams, m.refused, m.waits, m.sessions, m.dialErrors, m.handshakeErrors)
	}
	return m
}
