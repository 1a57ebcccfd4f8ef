package relay

import (
	"errors"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames/splice"
)

// tcpListeners keeps one listener bound for every TCP port the routing
// table routes, and splices each public connection it accepts to a data
// stream of the device the port routes to at that moment.
//
// It binds and closes sockets under its own lock, never the registry's:
// the registry says which ports changed, and sync reads the table again to
// bind or unbind them, so the listeners converge on the table whatever the
// order of concurrent changes.
type tcpListeners struct {
	host    string // address the listeners bind; empty means all interfaces
	reg     *registry
	metrics *metrics
	log     *slog.Logger
	listen  func(network, addr string) (net.Listener, error) // net.Listen; tests replace it

	mu     sync.Mutex
	lns    map[uint16]*portListener
	failed map[uint16]bool       // routed ports that could not be bound
	conns  map[net.Conn]struct{} // public connections being spliced
	closed bool
	wg     sync.WaitGroup // accept loops and spliced connections
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

func newTCPListeners(host string, reg *registry, m *metrics, log *slog.Logger) *tcpListeners {
	return &tcpListeners{host: host, reg: reg, metrics: m, log: log, listen: net.Listen,
		lns: map[uint16]*portListener{}, failed: map[uint16]bool{}, conns: map[net.Conn]struct{}{}}
}

// sync binds the given ports if the table routes them and closes their
// listeners if it does not. A port that cannot be bound is logged and
// counted; the lease stays valid on the other relays.
func (t *tcpListeners) sync(ports []uint16) {
	if len(ports) == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range ports {
		pl, bound := t.lns[p]
		rt, routed := t.reg.portRoute(p)
		switch want := routed && !t.closed; {
		case want && !bound:
			t.bindLocked(p, rt)
		case !want && bound:
			pl.close()
			delete(t.lns, p)
		case !want:
			delete(t.failed, p)
		}
	}
}

func (t *tcpListeners) bindLocked(port uint16, rt route) {
	addr := net.JoinHostPort(t.host, strconv.Itoa(int(port)))
	ln, err := t.listen("tcp", addr)
	if err != nil {
		t.metrics.tcpListenErrors.Inc()
		t.log.Error("cannot listen for TCP lease", "addr", addr, "device_id", rt.deviceID, "service", rt.service, "err", err)
		t.failed[port] = true
		return
	}
	delete(t.failed, port)
	pl := &portListener{port: port, ln: ln, done: make(chan struct{})}
	t.lns[port] = pl
	t.wg.Go(func() { t.acceptLoop(pl) })
}

// unbound returns the ports that should be bound and are not, sorted.
func (t *tcpListeners) unbound() []uint16 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Sorted(maps.Keys(t.failed))
}

// close closes every listener and every spliced connection, refuses to
// bind more, and waits for the accept loops and splices to end.
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
			t.log.Warn("accept TCP", "addr", pl.ln.Addr(), "err", err, "retry_in", delay)
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
			t.serveConn(pl.port, c)
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

// serveConn splices one public TCP connection to a data stream of the
// device that holds the port now. The client's bytes follow the stream
// header at once; the agent's answer is read before any byte goes back.
func (t *tcpListeners) serveConn(port uint16, c net.Conn) {
	sess, service := t.reg.lookupPort(port)
	if sess == nil {
		c.Close()
		return
	}
	t.metrics.tcpConns.Inc()
	st, err := sess.openStream(service, c.RemoteAddr().String())
	if err != nil {
		t.log.Info("open TCP stream", "device", sess.name, "service", service, "err", err)
		c.Close()
		return
	}
	res := splice.Splice(c, st)
	t.metrics.bytes.WithLabelValues("to_device").Add(float64(res.AToB))
	t.metrics.bytes.WithLabelValues("from_device").Add(float64(res.BToA))
	var refused *RefusedError
	if errors.As(res.Err, &refused) {
		t.log.Info("TCP connection refused by device", "device", sess.name, "service", service, "reason", refused.Refuse)
	}
}
