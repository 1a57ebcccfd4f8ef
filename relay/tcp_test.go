package relay

import (
	"errors"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

// failingListener fails every Accept, as a listener out of file
// descriptors does, and records when it was called.
type failingListener struct {
	mu      sync.Mutex
	calls   []time.Time
	closed  chan struct{}
	closing sync.Once
}

func (l *failingListener) Accept() (net.Conn, error) {
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, time.Now())
	return nil, errors.New("accept: too many open files")
}

func (l *failingListener) Close() error {
	l.closing.Do(func() { close(l.closed) })
	return nil
}

func (l *failingListener) Addr() net.Addr { return &net.TCPAddr{Port: 20000} }

// TestAcceptBackoff: after a failed Accept the loop waits 10ms, doubling
// up to 1s, and unbinding the port cuts a wait short.
func TestAcceptBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := newRegistry()
		sess := &session{deviceID: "dev1", leases: []controlplane.Lease{{Service: "ssh", Port: 20000}}}
		_, ports := reg.add(sess)
		ln := &failingListener{closed: make(chan struct{})}
		tl := newTCPListeners("127.0.0.1", reg, newMetrics(nil), slog.New(slog.NewTextHandler(t.Output(), nil)))
		tl.listen = func(string, string) (net.Listener, error) { return ln, nil }
		tl.sync(ports)

		time.Sleep(3 * time.Second)
		synctest.Wait()
		ln.mu.Lock()
		var gaps []time.Duration
		for i := 1; i < len(ln.calls); i++ {
			gaps = append(gaps, ln.calls[i].Sub(ln.calls[i-1]))
		}
		ln.mu.Unlock()
		ms := time.Millisecond
		want := []time.Duration{10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second}
		if !slices.Equal(gaps, want) {
			t.Fatalf("waits between accepts %v, want %v", gaps, want)
		}

		// In the middle of a 1s wait, the device leaves: the loop ends now.
		start := time.Now()
		tl.sync(reg.remove(sess))
		tl.close() // waits for the accept loop
		if waited := time.Since(start); waited != 0 {
			t.Fatalf("unbinding waited %v for the back-off", waited)
		}
	})
}

// TestListenersFollowTheTable: ports are bound when routed, kept when
// they pass to another device, and closed when nobody routes them; a port
// that cannot be bound is left unbound.
func TestListenersFollowTheTable(t *testing.T) {
	synctest.Test(t, testListenersFollowTheTable) // the accept loops' back-off runs on the bubble's clock
}

func testListenersFollowTheTable(t *testing.T) {
	reg := newRegistry()
	bound := map[string]*failingListener{}
	tl := newTCPListeners("127.0.0.1", reg, newMetrics(nil), slog.New(slog.NewTextHandler(t.Output(), nil)))
	tl.listen = func(_, addr string) (net.Listener, error) {
		if addr == "127.0.0.1:20009" {
			return nil, errors.New("address already in use")
		}
		ln := &failingListener{closed: make(chan struct{})}
		bound[addr] = ln
		return ln, nil
	}
	defer tl.close()
	lease := func(port uint16) []controlplane.Lease { return []controlplane.Lease{{Service: "ssh", Port: port}} }
	isOpen := func(addr string) bool {
		ln, ok := bound[addr]
		if !ok {
			return false
		}
		select {
		case <-ln.closed:
			return false
		default:
			return true
		}
	}

	newSession := func(gen uint64) *session {
		sess := &session{deviceID: "a", leases: lease(20001)}
		sess.gen.Store(gen)
		return sess
	}
	a := newSession(1)
	_, ports := reg.add(a)
	tl.sync(ports)
	if !isOpen("127.0.0.1:20001") {
		t.Fatal("leased port not bound")
	}
	tl.sync(reg.update(a, append(lease(20001), lease(20009)...)))
	if len(tl.lns) != 1 || isOpen("127.0.0.1:20009") {
		t.Fatalf("a port that cannot be bound: %v", tl.lns)
	}
	// A newer session of the same device keeps the listener.
	a2 := newSession(2)
	loser, ports := reg.add(a2)
	tl.sync(ports)
	if loser != a || !slices.Equal(ports, []uint16{20009}) || !isOpen("127.0.0.1:20001") {
		t.Fatalf("takeover: loser %v, ports %v, open %v", loser, ports, isOpen("127.0.0.1:20001"))
	}
	// The older session leaving changes nothing.
	if ports := reg.remove(a); len(ports) != 0 {
		t.Fatalf("stale session's removal changed ports %v", ports)
	}
	tl.sync(reg.remove(a2))
	if isOpen("127.0.0.1:20001") || len(tl.lns) != 0 {
		t.Fatal("port still bound after its device left")
	}
}
