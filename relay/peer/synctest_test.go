package peer_test

// The tests in this file run in testing/synctest bubbles over an
// in-memory network, where the keepalive, back-off and deadline timers
// run on the bubble's clock.

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/peer"
	"github.com/tetherfleet/tether/relay/peer/peertest"
)

// pipeNet is an in-memory network: listeners by name, and dialled
// connections (net.Pipe) that a test can cut silently, as a peer that
// froze or a pulled cable does. Dials can be held.
type pipeNet struct {
	mu     sync.Mutex
	lns    map[string]*pipeListener
	cables []*cable
	dials  int
	hold   chan struct{} // while non-nil and open, dials wait
}

func newPipeNet() *pipeNet { return &pipeNet{lns: map[string]*pipeListener{}} }

var errRefused = errors.New("pipe: connection refused")

func (n *pipeNet) listen(addr string) *pipeListener {
	ln := &pipeListener{addr: addr, conns: make(chan net.Conn), done: make(chan struct{})}
	n.mu.Lock()
	n.lns[addr] = ln
	n.mu.Unlock()
	return ln
}

// dialer makes a relay dial on the pipe network.
func (n *pipeNet) dialer(c *peer.Config) { c.DialContext = n.dial }

func (n *pipeNet) dial(ctx context.Context, _, addr string) (net.Conn, error) {
	n.mu.Lock()
	n.dials++
	ln, hold := n.lns[addr], n.hold
	n.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if ln == nil {
		return nil, errRefused
	}
	mine, theirs := net.Pipe()
	select {
	case ln.conns <- theirs:
	case <-ln.done:
		mine.Close()
		return nil, errRefused
	case <-ctx.Done():
		mine.Close()
		return nil, ctx.Err()
	}
	c := &cable{Conn: mine, cut: make(chan struct{}), closed: make(chan struct{})}
	n.mu.Lock()
	n.cables = append(n.cables, c)
	n.mu.Unlock()
	return c, nil
}

func (n *pipeNet) dialCount() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.dials
}

// cutAll cuts every connection dialled so far.
func (n *pipeNet) cutAll() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, c := range n.cables {
		c.cutOnce.Do(func() { close(c.cut) })
	}
}

type pipeListener struct {
	addr  string
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr(l.addr) }

type pipeAddr string

func (a pipeAddr) Network() string { return "pipe" }
func (a pipeAddr) String() string  { return string(a) }

// cable is the dialling end of a pipe. Once cut, nothing crosses it in
// either direction and nothing fails: reads and writes wait until the
// cable is closed.
type cable struct {
	net.Conn
	cut       chan struct{}
	cutOnce   sync.Once
	closed    chan struct{}
	closeOnce sync.Once
}

func (c *cable) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	select {
	case <-c.cut:
		<-c.closed
		return 0, net.ErrClosed
	default:
		return n, err
	}
}

func (c *cable) Write(p []byte) (int, error) {
	select {
	case <-c.cut:
		<-c.closed
		return 0, net.ErrClosed
	default:
		return c.Conn.Write(p)
	}
}

func (c *cable) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// pipePair starts relay-a and relay-b (holding dev-b) on a new pipe
// network.
func pipePair(t *testing.T) (n *pipeNet, a, b *testRelay) {
	n = newPipeNet()
	ca := peertest.NewCA(t)
	a = startRelayOn(t, ca, "relay-a", n.listen("a"), holder(), n.dialer)
	b = startRelayOn(t, ca, "relay-b", n.listen("b"), holder("dev-b"), n.dialer)
	return n, a, b
}

// TestDeadPeerDetected: an idle session lives on (keepalives cross it); a
// session whose peer went silent is closed on both sides 6 to 12 s after
// the last frame (KeepAlive 2 s), and the next Open dials a new one.
func TestDeadPeerDetected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n, a, b := pipePair(t)
		if err := echoCheck(a, "dev-b", 1000, b); err != nil {
			t.Fatal(err)
		}
		sessions := func() (out, in float64) {
			synctest.Wait()
			return a.metric(t, "tether_relay_peer_sessions", "direction=out"), b.metric(t, "tether_relay_peer_sessions", "direction=in")
		}

		time.Sleep(61 * time.Second) // not on a keepalive tick
		if out, in := sessions(); out != 1 || in != 1 {
			t.Fatalf("idle for a minute: %v sessions out, %v in; want 1 and 1", out, in)
		}
		n.cutAll() // the last frames crossed at 60 s
		time.Sleep(4900 * time.Millisecond)
		if out, in := sessions(); out != 1 || in != 1 {
			t.Fatalf("5.9 s after the last frame: %v sessions out, %v in; want 1 and 1", out, in)
		}
		time.Sleep(12*time.Second - 4900*time.Millisecond)
		if out, in := sessions(); out != 0 || in != 0 {
			t.Fatalf("13 s after the last frame: %v sessions out, %v in; want both closed", out, in)
		}
		if err := echoCheck(a, "dev-b", 1000, b); err != nil {
			t.Fatal(err)
		}
		if d := n.dialCount(); d != 2 {
			t.Errorf("%d dials, want 2", d)
		}
	})
}

// TestConcurrentOpensShareOneDial: fifty Opens to a peer with no session
// yet wait for one dial and share its session.
func TestConcurrentOpensShareOneDial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n, a, b := pipePair(t)
		hold := make(chan struct{})
		n.mu.Lock()
		n.hold = hold
		n.mu.Unlock()
		errs := make(chan error, 50)
		for range 50 {
			go func() { errs <- echoCheck(a, "dev-b", 4096, b) }()
		}
		synctest.Wait() // every Open is waiting
		if d := n.dialCount(); d != 1 {
			t.Fatalf("%d dials in flight, want 1", d)
		}
		close(hold)
		for range 50 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		if d, c := n.dialCount(), len(b.ln.taken()); d != 1 || c != 1 {
			t.Errorf("%d dials, %d connections accepted; want 1 and 1", d, c)
		}
	})
}

// TestRedialBackoff: after a failed dial, Opens fail at once without
// dialling for 100 ms (jittered down to 50), doubling up to 2 s; each
// failed dial is counted; a peer that comes back is dialled after the
// back-off.
func TestRedialBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newPipeNet()
		ca := peertest.NewCA(t)
		a := startRelayOn(t, ca, "relay-a", n.listen("a"), holder(), n.dialer)
		b := &testRelay{id: "relay-b", addr: "b"} // not listening yet
		for k := range 7 {
			d := min(100*time.Millisecond<<k, 2*time.Second)
			before := n.dialCount()
			if _, err := a.open(t.Context(), b, "dev-b"); !errors.Is(err, errRefused) || n.dialCount() != before+1 {
				t.Fatalf("failure %d: %v after %d dials, want a refused dial", k+1, err, n.dialCount()-before)
			}
			time.Sleep(d/2 - time.Millisecond)
			if _, err := a.open(t.Context(), b, "dev-b"); err == nil || !strings.Contains(err.Error(), "next dial in") || n.dialCount() != before+1 {
				t.Fatalf("within back-off %d: %v after %d dials, want a fast failure", k+1, err, n.dialCount()-before)
			}
			time.Sleep(d/2 + time.Millisecond)
		}
		if got := a.metric(t, "tether_relay_peer_dial_errors_total"); got != 7 {
			t.Errorf("dial errors = %v, want 7", got)
		}
		b = startRelayOn(t, ca, "relay-b", n.listen("b"), holder("dev-b"), n.dialer)
		if err := echoCheck(a, "dev-b", 1000, b); err != nil {
			t.Fatalf("the peer back: %v", err)
		}
	})
}

// TestDeadlines: a connection that does not start TLS is closed after
// HandshakeTimeout and counted; a stream without a peer-open is refused
// (bad request) after HandshakeTimeout and counted.
func TestDeadlines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := newPipeNet()
		ca := peertest.NewCA(t)
		b := startRelayOn(t, ca, "relay-b", n.listen("b"), holder("dev-b"), n.dialer)

		silent, err := n.dial(t.Context(), "tcp", "b")
		if err != nil {
			t.Fatal(err)
		}
		defer silent.Close()
		start := time.Now()
		if _, err := silent.Read(make([]byte, 1)); err == nil {
			t.Fatal("a silent connection got bytes")
		}
		if d := time.Since(start); d != 10*time.Second {
			t.Errorf("silent connection closed after %v, want 10s", d)
		}
		synctest.Wait()
		if got := b.metric(t, "tether_relay_peer_handshake_errors_total"); got != 1 {
			t.Errorf("handshake errors = %v, want 1", got)
		}

		c, err := n.dial(t.Context(), "tcp", "b")
		if err != nil {
			t.Fatal(err)
		}
		tc, err := rawHandshake(c, ca.Peer(t, "relay-x"), ca.Pool(), "relay-b", peer.Protocol)
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		sess := smuxClient(t, tc)
		st, err := sess.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		err = answer(st)
		var refuse *frames.StreamRefuse
		if !errors.As(err, &refuse) || refuse.Code != frames.CodeBadRequest {
			t.Fatalf("stream without peer-open: %v, want a bad request refusal", err)
		}
		if d := time.Since(start); d != 10*time.Second {
			t.Errorf("refused after %v, want 10s", d)
		}
		if _, err := io.ReadAll(st); err != nil {
			t.Errorf("after the refusal: %v, want EOF", err)
		}
		st.Close()
		if got := b.metric(t, "tether_relay_peer_streams_refused_total", "reason=bad_open"); got != 1 {
			t.Errorf("refused bad_open = %v, want 1", got)
		}
	})
}

// failingListener fails every Accept, as a listener out of file
// descriptors does, and records when it was called.
type failingListener struct {
	mu     sync.Mutex
	calls  []time.Time
	closed chan struct{}
	once   sync.Once
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
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *failingListener) Addr() net.Addr { return pipeAddr("failing") }

// TestAcceptBackoff: after a failed Accept, Serve waits 10 ms, doubling up
// to 1 s; the end of its context cuts a wait short and Serve returns nil.
func TestAcceptBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ca := peertest.NewCA(t)
		tr, err := peer.New(peer.Config{RelayID: "relay-b", Cert: ca.Peer(t, "relay-b"), Roots: ca.Pool(), Handler: holder()})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		ln := &failingListener{closed: make(chan struct{})}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- tr.Serve(ctx, ln) }()
		time.Sleep(3500 * time.Millisecond)
		start := time.Now()
		cancel()
		if err := <-done; err != nil || time.Since(start) != 0 {
			t.Fatalf("Serve after cancel: %v after %v, want nil at once", err, time.Since(start))
		}
		var gaps []time.Duration
		for i := 1; i < len(ln.calls); i++ {
			gaps = append(gaps, ln.calls[i].Sub(ln.calls[i-1]))
		}
		want := []time.Duration{10, 20, 40, 80, 160, 320, 640, 1000, 1000}
		for i := range want {
			want[i] *= time.Millisecond
		}
		if len(gaps) != len(want) {
			t.Fatalf("gaps %v, want %v", gaps, want)
		}
		for i := range want {
			if gaps[i] != want[i] {
				t.Fatalf("gaps %v, want %v", gaps, want)
			}
		}
	})
}
