package relay

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/splice"
)

// tcpListeners keeps one listener bound for every leased TCP port of the
// cluster, whichever relay holds the device (so a TCP load balancer may
// send a connection to any relay), and hands each connection accepted to
// serve.
//
// It binds and closes sockets under its own lock, never the registry's or
// the replica's: they say which ports are wanted (want, all), and sync or
// reconcile read them again to bind or unbind, so the listeners converge
// on them whatever the order of concurrent changes. A port that cannot be
// bound (another process holds it) is logged, counted and retried with
// back-off, and reported as unbound in the relay's hellos.
type tcpListeners struct {
	host    string                        // address the listeners bind; empty means all interfaces
	want    func(port uint16) bool        // whether a port is leased now
	all     func() []uint16               // every leased port
	serve   func(port uint16, c net.Conn) // serves one accepted connection
	metrics *metrics
	log     *slog.Logger
	// acceptErrors logs failed accepts (out of file descriptors: every
	// port fails at once) once per 10s with their count, not a line per
	// port per retry.
	acceptErrors *boundedLog
	listen       func(network, addr string) (net.Listener, error) // net.Listen; tests replace it
	now          func() time.Time                                 // time.Now; tests replace it

	mu     sync.Mutex
	lns    map[uint16]*portListener
	failed map[uint16]*bindFailure // wanted ports that could not be bound
	conns  map[net.Conn]struct{}   // public connections being served
	closed bool
	wg     sync.WaitGroup // accept loops and served connections
}

// portListener accepts public TCP connections for one leased port.
type portListener struct {
	port uint16
	ln   net.Listener
	done chan struct{} // closed when the port is unbound
	once sync.Once
}

func (p *portListener) close() {
	p.once.Do(func() {
		close(p.done)
		p.ln.Close()
	})
}

// bindFailure is a wanted port that could not be bound, retried from next.
type bindFailure struct {
	attempts int
	next     time.Time
}

// Bind retry back-off: from bindRetryMin, doubling up to bindRetryMax.
const (
	bindRetryMin = 10 * time.Second
	bindRetryMax = 2 * time.Minute
)

func bindRetry(attempts int) time.Duration {
	return min(bindRetryMin<<min(attempts-1, 8), bindRetryMax)
}

func newTCPListeners(host string, want func(uint16) bool, all func() []uint16, serve func(uint16, net.Conn), m *metrics, log *slog.Logger) *tcpListeners {
	return &tcpListeners{host: host, want: want, all: all, serve: serve, metrics: m, log: log, listen: net.Listen, now: time.Now,
		acceptErrors: newBoundedLog(log, 10*time.Second),
		lns:          map[uint16]*portListener{}, failed: map[uint16]*bindFailure{}, conns: map[net.Conn]struct{}{}}
}

// sync binds the given ports if they are wanted and closes their
// listeners if not. A port failing to bind is retried only once its
// back-off has passed.
func (t *tcpListeners) sync(ports []uint16) {
	if len(ports) == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range ports {
		t.syncLocked(p, t.want(p))
	}
	t.metrics.tcpUnbound.Set(float64(len(t.failed)))
}

// reconcile makes the listeners exactly the wanted ports: after the
// replica changed.
func (t *tcpListeners) reconcile() {
	wanted := t.all()
	t.mu.Lock()
	defer t.mu.Unlock()
	set := make(map[uint16]bool, len(wanted))
	for _, p := range wanted {
		set[p] = true
		t.syncLocked(p, true)
	}
	for p := range t.lns {
		if !set[p] {
			t.syncLocked(p, false)
		}
	}
	for p := range t.failed {
		if !set[p] {
			delete(t.failed, p)
		}
	}
	t.metrics.tcpUnbound.Set(float64(len(t.failed)))
}

func (t *tcpListeners) syncLocked(p uint16, want bool) {
	pl, bound := t.lns[p]
	switch want = want && !t.closed; {
	case want && !bound:
		if f := t.failed[p]; f == nil || !t.now().Before(f.next) {
			t.bindLocked(p)
		}
	case !want && bound:
		pl.close()
		delete(t.lns, p)
	case !want:
		delete(t.failed, p)
	}
}

func (t *tcpListeners) bindLocked(port uint16) {
	addr := net.JoinHostPort(t.host, strconv.Itoa(int(port)))
	ln, err := t.listen("tcp", addr)
	if err != nil {
		t.metrics.tcpListenErrors.Inc()
		f := t.failed[port]
		if f == nil {
			f = &bindFailure{}
			t.failed[port] = f
		}
		f.attempts++
		retry := bindRetry(f.attempts)
		f.next = t.now().Add(retry)
		level := slog.LevelDebug
		if f.attempts == 1 {
			level = slog.LevelError
		}
		t.log.Log(context.Background(), level, "cannot listen for a TCP lease: another process holds the port? retrying", "addr", addr, "attempts", f.attempts, "retry_in", retry, "err", err)
		return
	}
	if f := t.failed[port]; f != nil {
		t.log.Info("TCP lease port bound", "addr", addr, "after_attempts", f.attempts+1)
		delete(t.failed, port)
	}
	pl := &portListener{port: port, ln: ln, done: make(chan struct{})}
	t.lns[port] = pl
	t.wg.Go(func() { t.acceptLoop(pl) })
}

// retryLoop retries the ports that could not be bound, each when its
// back-off has passed, until ctx ends.
func (t *tcpListeners) retryLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		t.mu.Lock()
		var due []uint16
		for p, f := range t.failed {
			if !t.now().Before(f.next) {
				due = append(due, p)
			}
		}
		t.mu.Unlock()
		t.sync(due)
	}
}

// unbound returns the wanted ports that are not bound, sorted.
func (t *tcpListeners) unbound() []uint16 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Sorted(maps.Keys(t.failed))
}

// close closes every listener and every connection being served, refuses
// to bind more, and waits for the accept loops and connections to end.
func (t *tcpListeners) close() {
	t.mu.Lock()
	t.closed = true
	for p, pl := range t.lns {
		pl.close()
		delete(t.lns, p)
	}
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}

// Accept back-off after a failure other than a closed listener (nats-server's
// acceptError): it starts small and doubles, and the port's unbinding cuts it short.
const (
	acceptBackoffMin = 10 * time.Millisecond
	acceptBackoffMax = time.Second
)

// acceptLoop serves one port until its listener is closed.
func (t *tcpListeners) acceptLoop(pl *portListener) {
	var delay time.Duration
	for {
		c, err := pl.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, acceptBackoffMin), acceptBackoffMax)
			t.acceptErrors.note(pl.ln.Addr().String(), "accept TCP failed", "err", err)
			if !sleep(pl.done, delay) {
				return
			}
			continue
		}
		delay = 0
		if !t.track(c) {
			c.Close()
			return
		}
		t.wg.Go(func() {
			defer t.untrack(c)
			t.serve(pl.port, c)
		})
	}
}

// track registers a public connection so close can end it; false means
// the listeners are closing.
func (t *tcpListeners) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.conns[c] = struct{}{}
	return true
}

func (t *tcpListeners) untrack(c net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.conns, c)
}

// serveTCP is the route of a public TCP connection on a leased port:
//
//	port → a session here? → splice with a data stream of its agent
//	     → else the replica: device online on relay X → splice through X
//
// and closed wherever the route ends early.
func (s *Server) serveTCP(port uint16, c net.Conn) {
	s.metrics.tcpConns.Inc()
	if sess, service := s.reg.lookupPort(port); sess != nil && !s.isRevoked(sess.deviceID) {
		release, ok := s.tcpClientSlot(c, sess.deviceID, sess.name)
		if !ok {
			return
		}
		defer release()
		st, err := sess.openStream(service, c.RemoteAddr().String())
		if err != nil {
			s.log.Info("open TCP stream", "device", sess.name, "service", service, "err", err)
			c.Close()
			return
		}
		// The client's bytes follow the stream header at once; the agent's
		// answer is read before any byte goes back.
		s.spliceTCP(c, st, sess.name, service, shorterIdle(sess.idleFor(service), s.cfg.Public.TCPIdleTimeout))
		return
	}
	rec, lease, ok := s.replica.ByPort(port)
	if !ok {
		s.metrics.replicaLookups.WithLabelValues("miss").Inc()
		c.Close()
		return
	}
	s.metrics.replicaLookups.WithLabelValues("hit").Inc()
	if s.isRevoked(rec.ID) || !lease.Online || lease.Relay == s.cfg.RelayID || s.peer == nil {
		s.log.Debug("TCP connection for a device not served", "port", port, "device", rec.Name, "online", lease.Online, "relay", lease.Relay)
		c.Close()
		return
	}
	release, ok := s.tcpClientSlot(c, rec.ID, rec.Name)
	if !ok {
		return
	}
	defer release()
	ctx, cancel := context.WithTimeout(s.ctx, answerTimeout)
	st, err := s.dialPeer(ctx, rec, lease.Service, c.RemoteAddr().String())
	cancel()
	if err != nil {
		s.log.Info("forward TCP connection", "port", port, "device", rec.Name, "service", lease.Service, "err", err)
		c.Close()
		return
	}
	// The relay holding the session applies the service's own idle
	// timeout, which only it knows (servePeer); this one, the relay's.
	s.spliceTCP(c, st, rec.Name, lease.Service, s.cfg.Public.TCPIdleTimeout)
}

// spliceTCP copies a public connection and a stream to the device both
// ways until both end;
// idle closes the public connection after that long without a byte
// either way (zero: never).
func (s *Server) spliceTCP(c, st net.Conn, device, service string, idle time.Duration) {
	res := splice.Splice(&minRateConn{Conn: s.closeIdleTCP(c, idle), mr: s.newMinRate(), cut: s.slowClient}, st)
	s.metrics.bytes.WithLabelValues("to_device").Add(float64(res.AToB))
	s.metrics.bytes.WithLabelValues("from_device").Add(float64(res.BToA))
	var refused *RefusedError
	if errors.As(res.Err, &refused) {
		s.log.Info("TCP connection refused by device", "device", device, "service", service, "reason", refused.Refuse)
	}
}

// tcpClientSlot takes one of the client's connections to a device for a
// TCP connection, or closes it and returns false (MaxStreamsPerClient).
func (s *Server) tcpClientSlot(c net.Conn, deviceID, deviceName string) (release func(), ok bool) {
	release, ok = s.clients.take(deviceID, c.RemoteAddr().String())
	if !ok {
		s.metrics.streamsRefused.WithLabelValues("client_cap").Inc()
		s.log.Debug("TCP connection over the client's cap", "device", deviceName, "client", c.RemoteAddr().String())
		c.Close()
	}
	return release, ok
}

// Idle timeouts of TCP-lease connections. An agent may ask for one per
// tcp service (frames.Service.IdleSeconds); the relay's own
// (PublicLimits.TCPIdleTimeout) is a ceiling over every service, those
// that ask none included. A connection is closed after the shorter of
// the two without a byte either way; with neither, never.
//
// A connection forwarded from the relay the client reached to the relay
// holding the device's session gets the service's timeout there, on the
// peer stream (servePeer: closing it closes the client's connection), and
// the ceiling of the relay the client reached, at the client.

// tcpIdleFloor is the shortest idle timeout a service gets, in
// nanoseconds: what an agent asks below it is raised to it. Tests lower it.
var tcpIdleFloor atomic.Int64

func init() { tcpIdleFloor.Store(int64(frames.MinIdleSeconds * time.Second)) }

// setTCPIdle records the idle timeouts the agent asks for its tcp
// services in reg, replacing those of its previous registration. A value
// outside the protocol's bounds is clamped to them; an http service's
// is ignored.
func (sess *session) setTCPIdle(reg *frames.Register) {
	idle := map[string]time.Duration{}
	for _, svc := range reg.Services {
		if d := clampIdle(svc.IdleSeconds); d > 0 && svc.Proto == "tcp" {
			idle[svc.Name] = d
		}
	}
	sess.tcpIdle.Store(&idle)
}

// idleFor is the idle timeout the agent asked for a service; zero if none.
func (sess *session) idleFor(service string) time.Duration {
	if idle := sess.tcpIdle.Load(); idle != nil {
		return (*idle)[service]
	}
	return 0
}

// clampIdle is the idle timeout for a service that asks for seconds:
// zero for none, else seconds within tcpIdleFloor..frames.MaxIdleSeconds.
func clampIdle(seconds uint32) time.Duration {
	if seconds == 0 {
		return 0
	}
	d := time.Duration(min(seconds, frames.MaxIdleSeconds)) * time.Second
	return max(d, time.Duration(tcpIdleFloor.Load()))
}

// shorterIdle is the shorter of two idle timeouts, zero meaning none.
func shorterIdle(a, b time.Duration) time.Duration {
	if a <= 0 || b > 0 && b < a {
		return max(b, 0)
	}
	return a
}

// closeIdleTCP wraps a TCP-lease connection (a public client's, or the
// peer stream of a forwarded one) so that it is closed, and counted,
// after idle without a byte either way; zero means never.
func (s *Server) closeIdleTCP(c net.Conn, idle time.Duration) net.Conn {
	return closeIdle(c, idle, s.metrics.tcpIdleClosed.Inc)
}
