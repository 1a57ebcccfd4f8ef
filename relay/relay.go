// Package relay is Tether's public edge: it accepts agent sessions on
// /_tether/connect, enrolls devices on /_tether/enroll, and routes public
// HTTP by Host and public TCP by port to the agent's streams, through the
// relay of the cluster that holds the agent when it is not this one.
//
// # Shape
//
// Each file has one job:
//
//   - relay.go: the Server, its configuration and lifecycle (start, drain,
//     shutdown), and the one handler that tells agents from the public.
//   - session.go: one agent session: handshake, control loop, and the
//     control stream's single writer fed by a bounded queue.
//   - stream.go: data streams to a device and the agent's answer to each.
//   - registry.go: the routing table (device → newest session, hostname
//     label → route, port → route); it opens and closes nothing.
//   - http.go: the public HTTP route, Host → label → a session here, or
//     the replica's holder → the reverse proxy for that service, and the
//     error pages.
//   - tcp.go: one listener per leased TCP port of the cluster, bound and
//     closed outside the table's lock, and the route of each public
//     connection.
//   - enroll.go: enrollment; metrics.go: the Prometheus collectors.
//   - follow.go: the replica kept up to date from the control plane's
//     snapshots and device events, and what events do to local sessions.
//   - hello.go: membership (hellos, live peers) and the sync of the
//     sessions held here after the control plane was away.
//   - forward.go: public connections for devices held by other relays,
//     both ways over the peer transport (package peer).
//   - revoke.go: revocation notices; health.go: /readyz.
//   - certs.go: the relay's certificates from the cluster CA.
//
// The control plane is reached only through controlplane.Cluster (NATS in
// production), and never on a public request's path: the relay serves from
// its replica (package replica), also while the control plane is away.
// relay/cluster.md describes the protocol. Shutdown drains: agents are
// told to move, spread over a window, before their sessions close.
package relay

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay/peer"
	"github.com/tetherfleet/tether/relay/replica"
)

// Config configures a relay. Zero values of optional fields mean the
// documented defaults.
type Config struct {
	// RelayID is this relay's name in the cluster. Required.
	RelayID string
	// Domain is the base domain of service hostnames. Empty means "localhost".
	Domain string
	// PublicNames are the relay's own hostnames: a request to one of them
	// is for the relay (its agent endpoints), never for a lease. Nil means
	// none.
	PublicNames []string
	// ControlPlane authorises sessions, allocates leases, and tells the
	// relay what the cluster knows (natsapi.Client over NATS). Required.
	ControlPlane controlplane.Cluster
	// Replica is the relay's copy of the cluster's devices, which it keeps
	// up to date from the control plane's events and serves from, also
	// while the control plane is away (<data dir>/relay.db). The caller
	// opens it and closes it after the relay. Required.
	Replica *replica.Replica
	// TCPHost is the address TCP lease listeners bind to. Empty means all
	// interfaces.
	TCPHost string
	// TCPPorts is the cluster's range of TCP leases: the relay probes its
	// unleased ports and reports those another process holds, which the
	// control plane then leases to nobody (tcpprobe.go). Zero: no probe.
	TCPPorts controlplane.PortRange
	// MaxStreamsPerSession caps concurrent public connections to one
	// device. Zero means 1024.
	MaxStreamsPerSession int
	// MaxIdleStreams is how many idle HTTP streams are kept for reuse per
	// service of a device. Zero means 256.
	MaxIdleStreams int
	// ConnectLimit and EnrollLimit bound the attempts per client address
	// on /_tether/connect and /_tether/enroll (429 with Retry-After beyond
	// them). Zero fields mean DefaultConnectLimit and DefaultEnrollLimit.
	ConnectLimit, EnrollLimit RateLimit
	// ReleaseLimit bounds downloads per client address from /install.sh
	// and /_tether/release/. Zero fields mean DefaultReleaseLimit.
	ReleaseLimit RateLimit
	// HandshakeTimeout bounds an agent's handshake. Zero means 10s.
	HandshakeTimeout time.Duration
	// HeartbeatMin and HeartbeatMax bound the heartbeat interval of
	// agents: an agent's own is clamped to them and it is told the result
	// in its welcome, so that a dead agent's routes go within 3×HeartbeatMax.
	// Zero means 5s and 60s.
	HeartbeatMin, HeartbeatMax time.Duration
	// MaxHandshakes caps the agent handshakes in progress at once (before
	// the key is verified); more wait up to HandshakeTimeout, then get 503
	// (admission.go).
	// Zero means 1024.
	MaxHandshakes int
	// MaxHandshakesPerClient caps the handshake slots one client address
	// (IPv6: one /64) holds at once; its connections beyond wait for one of
	// its own slots, within the same queue and time, then get 429
	// (admission.go). Zero means 64, or MaxHandshakes/4 if less (at least 1).
	MaxHandshakesPerClient int
	// Public bounds public clients: timeouts, sizes, per-client caps
	// (public.go).
	Public PublicLimits
	// DrainWindow is the time over which Shutdown spreads drain notices.
	// Zero means 5s.
	DrainWindow time.Duration
	// ClusterAddr is where peer relays reach this one, announced in its
	// hellos. Empty means none (a relay without peers).
	ClusterAddr string
	// PeerCert is the relay's identity towards its peers: a leaf the
	// cluster root issued to RelayID (Certs.Peer). Nil means the relay
	// forwards nothing: a request for a device held by another relay gets
	// a page saying so.
	PeerCert *tls.Certificate
	// PeerRoots holds the cluster root that peers' certificates chain to.
	// Required with PeerCert.
	PeerRoots *x509.CertPool
	// MaxPeerStreams caps the streams open to one peer relay at once;
	// beyond it new ones wait. Zero means 1024.
	MaxPeerStreams int
	// HelloInterval is how often the relay says hello to the control
	// plane; it must be the control plane's. Zero means
	// controlplane.HelloInterval.
	HelloInterval time.Duration
	// Releases offers agent updates, serves their binaries and records
	// agents' update reports (natsapi.Client over NATS). Nil means agents
	// are never offered updates.
	Releases controlplane.Releases
	// UpdateInterval is how often the relay asks Releases whether an
	// agent should be offered an update (jittered ±50%; the first time a
	// few seconds after its session is up). Zero means 1m.
	UpdateInterval time.Duration
	// Mux tunes the smux sessions.
	Mux wsmux.Config
	// Logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the relay's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Server is a relay.
type Server struct {
	cfg     Config
	log     *slog.Logger
	cp      controlplane.Cluster
	replica *replica.Replica
	peer    *peer.Transport // nil without a peer certificate
	metrics *metrics
	reg     *registry
	gate    *gate       // agent handshakes in progress (admission.go)
	probe   *portProbe  // busy ports of the TCP range (tcpprobe.go; the hello loop's)
	clients *clientCaps // public clients' connections per device (public.go)
	tcp     *tcpListeners
	limits  *edgeLimits // per-client rate limits on the agent endpoints

	ctx    context.Context // ends at Shutdown's end; bounds sessions and loops
	cancel context.CancelFunc
	wg     sync.WaitGroup // session handlers (see track)
	loops  sync.WaitGroup // follow, hello and revocation loops

	// The control plane's device events, queued for the follow loop;
	// eventsLost says the queue overflowed (a snapshot is due).
	events     chan controlplane.DeviceEvent
	eventsLost atomic.Bool
	resync     chan struct{} // asks the follow loop for a snapshot (1 slot)

	reachable  atomic.Bool // the last hello reached the control plane
	helloFails int         // hellos failed in a row (the hello loop's own)
	needSync   atomic.Bool // the control plane may not know the sessions held here
	// syncMu: a sync (writer) sees every session the control plane was
	// told of and none it was told ended; handshakes from their connect
	// to their routing, and goodbyes, are readers.
	syncMu sync.RWMutex

	fmu        sync.Mutex
	forwarders map[string]*serviceProxy // device ID/service → proxy through peers

	mu         sync.Mutex
	draining   bool
	peers      map[string]string // live peer relays: ID → cluster address
	helloEpoch string            // the control plane's (epoch, seq) at the last hello
	helloSeq   uint64
}

// New validates cfg and returns a relay. Call Start before serving.
func New(cfg Config) (*Server, error) {
	if cfg.RelayID == "" {
		return nil, errors.New("relay: RelayID is required")
	}
	if cfg.ControlPlane == nil {
		return nil, errors.New("relay: ControlPlane is required")
	}
	if cfg.Replica == nil {
		return nil, errors.New("relay: Replica is required")
	}
	if err := cfg.Mux.Verify(); err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	cfg.Domain = strings.ToLower(strings.TrimSuffix(cmp.Or(cfg.Domain, "localhost"), "."))
	names := make([]string, 0, len(cfg.PublicNames))
	for _, n := range cfg.PublicNames {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		if err := validHostname(n); err != nil {
			return nil, fmt.Errorf("relay: public name: %w", err)
		}
		names = append(names, n)
	}
	cfg.PublicNames = names
	cfg.MaxStreamsPerSession = cmp.Or(cfg.MaxStreamsPerSession, 1024)
	cfg.MaxIdleStreams = cmp.Or(cfg.MaxIdleStreams, 256)
	cfg.HandshakeTimeout = cmp.Or(cfg.HandshakeTimeout, 10*time.Second)
	cfg.HeartbeatMin = cmp.Or(cfg.HeartbeatMin, 5*time.Second)
	cfg.HeartbeatMax = max(cmp.Or(cfg.HeartbeatMax, 60*time.Second), cfg.HeartbeatMin)
	cfg.MaxHandshakes = cmp.Or(max(cfg.MaxHandshakes, 0), 1024)
	cfg.MaxHandshakesPerClient = min(cmp.Or(max(cfg.MaxHandshakesPerClient, 0), min(64, max(cfg.MaxHandshakes/4, 1))), cfg.MaxHandshakes)
	cfg.Public = cfg.Public.withDefaults()
	cfg.DrainWindow = cmp.Or(cfg.DrainWindow, 5*time.Second)
	cfg.HelloInterval = cmp.Or(cfg.HelloInterval, controlplane.HelloInterval)
	cfg.UpdateInterval = cmp.Or(cfg.UpdateInterval, time.Minute)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log, cp: cfg.ControlPlane, replica: cfg.Replica, metrics: newMetrics(cfg.Registerer),
		events: make(chan controlplane.DeviceEvent, eventQueueLen), resync: make(chan struct{}, 1),
		forwarders: map[string]*serviceProxy{}, gate: newGate(cfg.MaxHandshakes, cfg.MaxHandshakesPerClient, cfg.HandshakeTimeout), probe: newPortProbe(cfg.TCPPorts),
		clients: newClientCaps(cfg.Public.MaxStreamsPerClient)}
	var err error
	if s.peer, err = s.newPeerTransport(); err != nil {
		return nil, err
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.reg = newRegistry()
	s.limits = newEdgeLimits(cfg, log, cfg.Registerer)
	s.tcp = newTCPListeners(cfg.TCPHost, s.wantPort, s.leasedPorts, s.serveTCP, s.metrics, log)
	return s, nil
}

// Start subscribes to the control plane's device events, tells it that
// this relay holds no sessions (it may have restarted), brings the replica
// up to date and starts following the control plane. A control plane that
// cannot be reached does not stop the relay: it serves from its replica
// and catches up when the control plane answers again. Start fails when a
// public name of the relay is leased to a device.
func (s *Server) Start(ctx context.Context) error {
	watching := true
	if err := s.cp.Watch(s.ctx, s.queueEvent); err != nil {
		s.log.Warn("cannot subscribe to device events yet: serving from the replica", "err", err)
		watching = false
	}
	if err := s.cp.ResetRelay(ctx, s.cfg.RelayID); err != nil {
		if controlplane.KindOf(err) != controlplane.KindUnavailable {
			return fmt.Errorf("reset presence of relay %s: %w", s.cfg.RelayID, err)
		}
		s.log.Warn("control plane unreachable at start: serving from the replica", "err", err)
		s.needSync.Store(true) // it may still count sessions of this relay's last run
	}
	fresh := false
	if watching {
		if err := s.snapshot(ctx); err != nil {
			s.log.Warn("replica snapshot at start failed: serving from the replica as kept", "err", err)
		} else {
			fresh = true
		}
	}
	if err := s.checkPublicNames(); err != nil {
		return err
	}
	s.tcp.reconcile()
	s.loops.Go(func() { s.tcp.retryLoop(s.ctx) })
	s.loops.Go(func() { s.follow(watching, fresh) })
	s.loops.Go(s.helloLoop)
	s.loops.Go(s.serveRevocations)
	return nil
}

// wantPort reports whether a TCP port is leased: to a session here, or
// in the replica.
func (s *Server) wantPort(port uint16) bool {
	if _, ok := s.reg.portRoute(port); ok {
		return true
	}
	_, _, ok := s.replica.ByPort(port)
	return ok
}

// leasedPorts returns every leased TCP port: the replica's and those of
// the sessions here (which the replica may not know yet).
func (s *Server) leasedPorts() []uint16 {
	ports := s.replica.Ports()
	for _, p := range s.reg.portList() {
		if _, found := slices.BinarySearch(ports, p); !found {
			ports = append(ports, p)
		}
	}
	return ports
}

// ownLabels returns the hostname labels the relay's public names take
// under its domain: the control plane never leases them.
func (s *Server) ownLabels() []string {
	var labels []string
	for _, name := range s.cfg.PublicNames {
		if label, ok := s.label(name); ok {
			labels = append(labels, label)
		}
	}
	return labels
}

// checkPublicNames refuses a public name of the relay that the replica
// says is leased to a device.
func (s *Server) checkPublicNames() error {
	for _, label := range s.ownLabels() {
		if rec, lease, ok := s.replica.ByHostname(label); ok {
			return fmt.Errorf("public name %s of this relay is leased to service %s of device %s: a relay's own names are never leased; choose another TETHER_PUBLIC_NAMES or release the lease",
				s.Hostname(label), lease.Service, rec.Name)
		}
	}
	return nil
}

// Handler serves the relay's HTTPS listener: the agent endpoints and
// public HTTPS.
func (s *Server) Handler() http.Handler { return s.handler("https", true) }

// PublicHTTPHandler serves the plain-HTTP listener: public HTTP only.
func (s *Server) PublicHTTPHandler() http.Handler { return s.handler("http", false) }

// handler serves agents on their two paths (unless the Host is shaped
// like a service's: there those paths are the service's own) and
// everything else as public HTTP.
func (s *Server) handler(scheme string, agents bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, leaseName := s.label(r.Host); agents && (!leaseName || s.ownName(r.Host)) {
			if r.URL.Path == InstallPath || strings.HasPrefix(r.URL.Path, ReleasePath) {
				s.limits.release.wrap(func(w http.ResponseWriter, r *http.Request) { s.serveRelease(w, r) })(w, r) // release_http.go
				return
			}
			switch r.URL.Path {
			case frames.ConnectPath:
				s.limits.connect.wrap(s.serveAgent)(w, r)
				return
			case frames.EnrollPath:
				s.limits.enroll.wrap(s.serveEnroll)(w, r)
				return
			}
		}
		s.servePublic(w, r, scheme)
	})
}

// ownName reports whether host (with or without a port) is one of the
// relay's public names.
func (s *Server) ownName(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return slices.Contains(s.cfg.PublicNames, strings.ToLower(strings.TrimSuffix(host, ".")))
}

// validHostname checks a DNS host name: labels of a-z, 0-9 and inner '-',
// 1 to 63 long, 253 in all.
func validHostname(name string) error {
	if name == "" || len(name) > 253 {
		return fmt.Errorf("%q: not a host name (1 to 253 characters)", name)
	}
	for label := range strings.SplitSeq(name, ".") {
		if controlplane.ValidRelayID(label) != nil { // one DNS label: the same grammar
			return fmt.Errorf("%q: label %q is not a DNS label (1-63 of a-z, 0-9, inner '-')", name, label)
		}
	}
	return nil
}

// Hostname returns the public hostname of a lease label.
func (s *Server) Hostname(label string) string { return label + "." + s.cfg.Domain }

func (s *Server) isDraining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

// track counts a session handler in s.wg, unless the relay is draining:
// checked under the same lock, so no handler is added once Shutdown waits.
func (s *Server) track() (done func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return nil, false
	}
	s.wg.Add(1)
	return s.wg.Done, true
}

// Shutdown drains the relay: it refuses new agent sessions, tells every
// agent to move (the notices spread over DrainWindow, so agents do not all
// reconnect at once), closes the sessions still open at the end of the
// window or when ctx ends, closes the TCP listeners and waits for all of
// it. http.Server.Shutdown does not wait for the hijacked agent connections;
// this does.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	already := s.draining
	s.draining = true
	s.mu.Unlock()
	if !already {
		sessions := s.reg.all()
		s.log.Info("draining relay", "sessions", len(sessions), "window", s.cfg.DrainWindow)
		window, cancel := context.WithTimeout(ctx, s.cfg.DrainWindow)
		var notices sync.WaitGroup
		notices.Go(func() { s.sendDrainNotices(window, sessions) })
		s.waitForMoves(window)
		cancel() // ends the notices too, if every agent left before its turn
		notices.Wait()
	}
	s.cancel() // closes every session, ends the loops
	done := make(chan struct{})
	// The one goroutine here that nothing waits for: it lets ctx bound the
	// wait, and ends when the sessions, loops and TCP connections do.
	go func() {
		s.tcp.close()
		s.wg.Wait()
		s.loops.Wait()
		s.closePeers()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("relay shutdown: %w", ctx.Err())
	}
	// One request marks every session of this relay ended. Without a
	// control plane, it learns it when this relay falls silent.
	if err := s.cp.ResetRelay(ctx, s.cfg.RelayID); err != nil {
		if controlplane.KindOf(err) == controlplane.KindUnavailable {
			s.log.Warn("relay shutdown: the control plane is unreachable; it marks the sessions ended once this relay is silent", "err", err)
			return nil
		}
		return fmt.Errorf("relay shutdown: report sessions ended: %w", err)
	}
	return nil
}

// sendDrainNotices asks each agent to move, the notices spread evenly over
// the drain window (so the agents do not all reconnect at once), each
// giving the rest of the window. It returns when all are sent or ctx ends.
func (s *Server) sendDrainNotices(ctx context.Context, sessions []*session) {
	start := time.Now()
	for i, sess := range sessions {
		at := time.Duration(int64(s.cfg.DrainWindow) * int64(i) / int64(len(sessions)))
		if !sleep(ctx.Done(), time.Until(start.Add(at))) {
			return
		}
		within := s.cfg.DrainWindow - at
		sess.log.Info("asking agent to move", "within", within)
		sess.send(&frames.Drain{Reason: "relay is shutting down", WithinMillis: uint32(within / time.Millisecond)})
	}
}

// sleep waits for d and reports true, or reports false as soon as done is
// closed: a wait that shutdown interrupts.
func sleep(done <-chan struct{}, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-done:
		return false
	}
}

// waitForMoves returns when every agent has left or ctx ends.
func (s *Server) waitForMoves(ctx context.Context) {
	for {
		n, changed := s.reg.changes()
		if n == 0 {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// Close stops the relay at once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.draining = true
	s.mu.Unlock()
	s.cancel()
	s.tcp.close()
	s.wg.Wait()
	s.loops.Wait()
	s.closePeers()
	return nil
}

// closePeers closes the peer transport (its sessions both ways) and the
// forwarding proxies' idle streams.
func (s *Server) closePeers() {
	if s.peer != nil {
		s.peer.Close()
	}
	s.closeForwarders()
}

// Sessions is the number of live agent sessions.
func (s *Server) Sessions() int { return len(s.reg.all()) }
