package relay

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
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

// leased is a fake set of leased ports, for want and all.
type leased struct {
	mu    sync.Mutex
	ports map[uint16]bool
}

func newLeased(ports ...uint16) *leased {
	l := &leased{ports: map[uint16]bool{}}
	l.set(ports...)
	return l
}

func (l *leased) set(ports ...uint16) {
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.ports)
	for _, p := range ports {
		l.ports[p] = true
	}
}

func (l *leased) has(p uint16) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ports[p]
}

func (l *leased) all() []uint16 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Sorted(maps.Keys(l.ports))
}

func newTestListeners(t *testing.T, l *leased) *tcpListeners {
	return newTCPListeners("127.0.0.1", l.has, l.all, func(_ uint16, c net.Conn) { c.Close() }, newMetrics(nil), slog.New(slog.NewTextHandler(t.Output(), nil)))
}

// TestAcceptBackoff: after a failed Accept the loop waits 10ms, doubling
// up to 1s, and unbinding the port cuts a wait short.
func TestAcceptBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLeased(20000)
		ln := &failingListener{closed: make(chan struct{})}
		tl := newTestListeners(t, l)
		tl.listen = func(string, string) (net.Listener, error) { return ln, nil }
		tl.sync([]uint16{20000})

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

		// In the middle of a 1s wait, the lease goes: the loop ends now.
		start := time.Now()
		l.set()
		tl.sync([]uint16{20000})
		tl.close() // waits for the accept loop
		if waited := time.Since(start); waited != 0 {
			t.Fatalf("unbinding waited %v for the back-off", waited)
		}
	})
}

// TestListenersFollowTheLeases: every leased port is bound, and closed
// once no longer leased; a port another process holds is reported
// unbound and retried after 10s, then 20s, until it binds.
func TestListenersFollowTheLeases(t *testing.T) {
	synctest.Test(t, testListenersFollowTheLeases) // the back-offs run on the bubble's clock
}

func testListenersFollowTheLeases(t *testing.T) {
	l := newLeased()
	var mu sync.Mutex
	bound := map[string]*failingListener{}
	held, attempts := true, 0 // 20009 is another process's
	tl := newTestListeners(t, l)
	tl.listen = func(_, addr string) (net.Listener, error) {
		mu.Lock()
		defer mu.Unlock()
		if addr == "127.0.0.1:20009" {
			attempts++
			if held {
				return nil, errors.New("address already in use")
			}
		}
		ln := &failingListener{closed: make(chan struct{})}
		bound[addr] = ln
		return ln, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	var retry sync.WaitGroup
	retry.Go(func() { tl.retryLoop(ctx) })
	defer func() {
		cancel()
		retry.Wait()
		tl.close()
	}()
	isOpen := func(addr string) bool {
		mu.Lock()
		defer mu.Unlock()
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
	tries := func() int {
		mu.Lock()
		defer mu.Unlock()
		return attempts
	}

	l.set(20001)
	tl.sync([]uint16{20001})
	if !isOpen("127.0.0.1:20001") {
		t.Fatal("leased port not bound")
	}
	l.set(20001, 20009)
	tl.reconcile()
	if len(tl.lns) != 1 || isOpen("127.0.0.1:20009") || !slices.Equal(tl.unbound(), []uint16{20009}) {
		t.Fatalf("a port that cannot be bound: bound %v, unbound %v", tl.lns, tl.unbound())
	}
	tl.reconcile() // before its back-off: not tried again
	time.Sleep(9 * time.Second)
	synctest.Wait()
	if n := tries(); n != 1 {
		t.Fatalf("%d attempts within 9s, want 1", n)
	}
	time.Sleep(2 * time.Second)
	synctest.Wait()
	if n := tries(); n != 2 {
		t.Fatalf("%d attempts after 11s, want 2", n)
	}
	mu.Lock()
	held = false
	mu.Unlock()
	time.Sleep(21 * time.Second) // the next retry is 20s after the second
	synctest.Wait()
	if !isOpen("127.0.0.1:20009") || len(tl.unbound()) != 0 {
		t.Fatalf("after the port was freed: open %v, unbound %v", isOpen("127.0.0.1:20009"), tl.unbound())
	}
	l.set(20009)
	tl.reconcile()
	if isOpen("127.0.0.1:20001") || !isOpen("127.0.0.1:20009") {
		t.Fatal("a port no longer leased is still bound")
	}
	l.set()
	tl.sync([]uint16{20009})
	if isOpen("127.0.0.1:20009") || len(tl.lns) != 0 {
		t.Fatal("port still bound after its lease went")
	}
}
