package peer_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/peer"
	"github.com/tetherfleet/tether/relay/peer/peertest"
	"github.com/tetherfleet/tether/relay/relaytest"
)

func TestMain(m *testing.M) { relaytest.RunWithLeakCheck(m) }

// testRelay is one relay's peer transport, serving on a loopback
// listener that counts and keeps the connections it accepts.
type testRelay struct {
	id   string
	addr string
	tr   *peer.Transport
	reg  *prometheus.Registry
	ln   *countingListener
	done chan error // Serve's result
}

// startRelay starts relay id serving peers on TCP addr (host:0, or the
// address of a relay that comes back) with handler h; it is closed when
// the test ends.
func startRelay(t testing.TB, ca *peertest.CA, id, addr string, h peer.Handler, tweak ...func(*peer.Config)) *testRelay {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return startRelayOn(t, ca, id, ln, h, tweak...)
}

// startRelayOn starts relay id serving peers on ln with handler h, its
// Config changed by tweak; it is closed when the test ends.
func startRelayOn(t testing.TB, ca *peertest.CA, id string, ln net.Listener, h peer.Handler, tweak ...func(*peer.Config)) *testRelay {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := peer.Config{RelayID: id, Cert: ca.Peer(t, id), Roots: ca.Pool(), Handler: h,
		Logger: testLogger(t), Registerer: reg}
	for _, f := range tweak {
		f(&cfg)
	}
	tr, err := peer.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r := &testRelay{id: id, addr: ln.Addr().String(), tr: tr, reg: reg, ln: &countingListener{Listener: ln}, done: make(chan error, 1)}
	go func() { r.done <- tr.Serve(context.Background(), r.ln) }()
	t.Cleanup(r.close(t))
	return r
}

// close returns a func that closes the relay and checks Serve's result.
func (r *testRelay) close(t testing.TB) func() {
	return func() {
		r.tr.Close()
		if err := <-r.done; err != nil {
			t.Errorf("relay %s: Serve: %v", r.id, err)
		}
		r.done <- nil // closed again by a later cleanup: no error
	}
}

// kill ends the relay as a crash would: its listener closed and its
// connections reset, then its goroutines stopped.
func (r *testRelay) kill(t testing.TB) {
	r.ln.Close()
	for _, c := range r.ln.taken() {
		c.(*net.TCPConn).SetLinger(0) // RST, not FIN
		c.Close()
	}
	r.tr.Close()
	<-r.done      // the error of the listener closed under it
	r.done <- nil // for the cleanup
}

func (r *testRelay) open(ctx context.Context, to *testRelay, device string) (net.Conn, error) {
	return r.tr.Open(ctx, to.id, to.addr, &frames.PeerOpen{DeviceID: device, Service: "echo", ClientAddr: "203.0.113.7:40000"})
}

// metric sums the counters and gauges called name whose series carry
// every label given as "name=value".
func (r *testRelay) metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var have []string
			for _, l := range m.GetLabel() {
				have = append(have, l.GetName()+"="+l.GetValue())
			}
			if !slices.ContainsFunc(labels, func(l string) bool { return !slices.Contains(have, l) }) {
				sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
	}
	return sum
}

// countingListener counts and keeps the connections it accepts.
type countingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *countingListener) taken() []net.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.conns)
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type closeWriter interface{ CloseWrite() error }

// holder is the Handler of a relay holding devices: each one's "agent"
// accepts service "echo" and sends every byte back, then half-closes;
// other devices are not here.
func holder(devices ...string) peer.Handler {
	return func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
		switch {
		case !slices.Contains(devices, open.DeviceID):
			frames.Write(st, &frames.StreamRefuse{Code: frames.CodeNotHere, Message: open.DeviceID + " is not here"})
			return
		case open.Service != "echo" || open.ClientAddr != "203.0.113.7:40000":
			frames.Write(st, &frames.StreamRefuse{Code: frames.CodeUnknownService, Message: open.Service})
			return
		}
		if frames.Write(st, &frames.StreamAccept{}) != nil {
			return
		}
		buf := make([]byte, 32<<10)
		if _, err := io.CopyBuffer(struct{ io.Writer }{st}, struct{ io.Reader }{st}, buf); err == nil {
			st.(closeWriter).CloseWrite()
		}
	}
}

// exchange writes data on a stream from Open and half-closes it while it
// reads the answer and everything after it, then closes the stream.
func exchange(st net.Conn, data []byte) ([]byte, error) {
	defer st.Close()
	written := make(chan error, 1)
	go func() {
		_, err := st.Write(data)
		if err == nil {
			err = st.(closeWriter).CloseWrite()
		}
		written <- err
	}()
	var got []byte
	err := answer(st)
	if err == nil {
		got, err = io.ReadAll(st)
	}
	if err != nil {
		st.Close() // unblock the writer
	}
	if werr := <-written; err == nil {
		err = werr
	}
	return got, err
}

// answer reads the answer to a stream's peer-open: nil for stream-accept,
// the *frames.StreamRefuse, or what went wrong.
func answer(st net.Conn) error {
	m, err := frames.Read(st, 0)
	switch m := m.(type) {
	case *frames.StreamAccept:
		return nil
	case *frames.StreamRefuse:
		return m
	case nil:
		return err
	}
	return fmt.Errorf("unexpected %v frame", m.Type())
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// echoCheck opens a stream from r to device on one of peers, trying them
// in order while they answer not here (as a relay looking for the holder
// does), and checks that n random bytes come back intact.
func echoCheck(r *testRelay, device string, n int, peers ...*testRelay) error {
	data := randomBytes(n)
	for _, to := range peers {
		st, err := r.open(context.Background(), to, device)
		if err != nil {
			return fmt.Errorf("open %s on %s: %w", device, to.id, err)
		}
		got, err := exchange(st, data)
		var refuse *frames.StreamRefuse
		if errors.As(err, &refuse) && refuse.Code == frames.CodeNotHere {
			continue
		}
		if err != nil {
			return fmt.Errorf("%s to %s on %s: %w", r.id, device, to.id, err)
		}
		if !bytes.Equal(got, data) {
			return fmt.Errorf("%s to %s on %s: sent %d bytes, got %d back, not the same", r.id, device, to.id, len(data), len(got))
		}
		return nil
	}
	return fmt.Errorf("%s: no peer holds %s", r.id, device)
}

// run runs fns at once and returns their errors joined.
func run(fns ...func() error) error {
	errs := make([]error, len(fns))
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Go(func() { errs[i] = fn() })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// TestForwardTwoRelays: one stream of 16 MiB both ways and 32 streams at
// once, all over one connection and one session, with every byte intact
// and the half-close passed on.
func TestForwardTwoRelays(t *testing.T) {
	ca := peertest.NewCA(t)
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder())
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b"))

	fns := []func() error{func() error { return echoCheck(a, "dev-b", 16<<20, b) }}
	for range 32 {
		fns = append(fns, func() error { return echoCheck(a, "dev-b", 128<<10, b) })
	}
	if err := run(fns...); err != nil {
		t.Fatal(err)
	}
	if n := len(b.ln.taken()); n != 1 {
		t.Errorf("relay-b accepted %d connections, want 1", n)
	}
	if got := a.metric(t, "tether_relay_peer_streams_total", "peer=relay-b", "direction=out"); got != 33 {
		t.Errorf("relay-a streams out = %v, want 33", got)
	}
	if got := b.metric(t, "tether_relay_peer_streams_total", "peer=relay-a", "direction=in"); got != 33 {
		t.Errorf("relay-b streams in = %v, want 33", got)
	}
	if a.metric(t, "tether_relay_peer_sessions", "direction=out") != 1 || b.metric(t, "tether_relay_peer_sessions", "direction=in") != 1 {
		t.Errorf("sessions: relay-a out %v, relay-b in %v; want 1 and 1",
			a.metric(t, "tether_relay_peer_sessions", "direction=out"), b.metric(t, "tether_relay_peer_sessions", "direction=in"))
	}
}

// TestForwardThreeRelays: three relays each hold a device and reach the
// other two devices, trying the wrong peer first (not here), all at once,
// with a 16 MiB stream among them; each relay ends with one session to
// and one from each peer.
func TestForwardThreeRelays(t *testing.T) {
	ca := peertest.NewCA(t)
	rs := []*testRelay{
		startRelay(t, ca, "relay-a", "127.0.0.1:0", holder("dev-a")),
		startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b")),
		startRelay(t, ca, "relay-c", "127.0.0.3:0", holder("dev-c")),
	}
	var fns []func() error
	for i, from := range rs {
		for j, to := range rs {
			if i == j {
				continue
			}
			other := rs[3-i-j]
			device := "dev-" + strings.TrimPrefix(to.id, "relay-")
			for k := range 4 {
				size := 64 << 10
				if i == 0 && j == 2 && k == 0 {
					size = 16 << 20
				}
				fns = append(fns, func() error { return echoCheck(from, device, size, other, to) })
			}
		}
	}
	if err := run(fns...); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		out, in := r.metric(t, "tether_relay_peer_sessions", "direction=out"), r.metric(t, "tether_relay_peer_sessions", "direction=in")
		if out != 2 || in != 2 || len(r.ln.taken()) != 2 {
			t.Errorf("%s: %v sessions out, %v in, %d connections accepted; want 2, 2, 2", r.id, out, in, len(r.ln.taken()))
		}
		if got := r.metric(t, "tether_relay_peer_streams_total", "direction=in"); got != 16 {
			t.Errorf("%s: %v streams in, want 16 (8 served, 8 not here)", r.id, got)
		}
	}
}

// TestStreamCapBackPressure: with MaxStreams open to a peer, Open waits;
// it gives up with ErrBusy when its context ends, and goes on as soon as a
// stream is closed. Both are counted.
func TestStreamCapBackPressure(t *testing.T) {
	ca := peertest.NewCA(t)
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder(), func(c *peer.Config) { c.MaxStreams = 4 })
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b"))

	var open []net.Conn
	for range 4 {
		st, err := a.open(t.Context(), b, "dev-b")
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, st)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := a.open(ctx, b, "dev-b"); !errors.Is(err, peer.ErrBusy) || !errors.Is(err, context.Canceled) {
		t.Fatalf("fifth Open with an ended context: %v, want ErrBusy and context.Canceled", err)
	}
	if got := a.metric(t, "tether_relay_peer_streams_refused_total", "reason=busy"); got != 1 {
		t.Errorf("refused busy = %v, want 1", got)
	}

	waited := make(chan error, 1)
	go func() {
		st, err := a.open(t.Context(), b, "dev-b")
		if err == nil {
			_, err = exchange(st, []byte("after the wait"))
		}
		waited <- err
	}()
	relaytest.Eventually(t, 5*time.Second, func() error { // the Open is waiting
		if n := a.metric(t, "tether_relay_peer_stream_waits_total"); n != 2 {
			return fmt.Errorf("%v waits", n)
		}
		return nil
	})
	select {
	case err := <-waited:
		t.Fatalf("Open returned with 4 streams open: %v", err)
	default:
	}
	open[0].Close()
	if err := <-waited; err != nil {
		t.Fatalf("Open after a stream closed: %v", err)
	}
	for _, st := range open[1:] {
		if _, err := exchange(st, []byte("still fine")); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPeerStreamCap: the accepting side refuses a stream beyond its cap
// with too many streams (for a peer whose own cap is larger), counts it,
// and serves again once a handler returned.
func TestPeerStreamCap(t *testing.T) {
	ca := peertest.NewCA(t)
	entered := make(chan struct{})
	release := make(chan struct{})
	blocking := func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
		entered <- struct{}{}
		select {
		case <-release:
			holder("dev-b")(ctx, open, st)
		case <-ctx.Done():
		}
	}
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder(), func(c *peer.Config) { c.MaxStreams = 8 })
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", blocking, func(c *peer.Config) { c.MaxPeerStreams = 3 })

	var held []net.Conn
	for range 3 {
		st, err := a.open(t.Context(), b, "dev-b")
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, st)
		<-entered
	}
	st, err := a.open(t.Context(), b, "dev-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = exchange(st, []byte("one too many"))
	var refuse *frames.StreamRefuse
	if !errors.As(err, &refuse) || refuse.Code != frames.CodeTooManyStreams {
		t.Fatalf("fourth stream: %v, want a too many streams refusal", err)
	}
	if got := b.metric(t, "tether_relay_peer_streams_refused_total", "reason=cap"); got != 1 {
		t.Errorf("refused cap = %v, want 1", got)
	}
	close(release)
	for _, st := range held {
		if _, err := exchange(st, []byte("served")); err != nil {
			t.Fatal(err)
		}
	}
	go func() { <-entered }()
	if err := echoCheck(a, "dev-b", 1000, b); err != nil {
		t.Fatal(err)
	}
}

// TestKilledPeerIsRedialled: a peer that crashes (listener closed,
// connections reset) is noticed at once, Opens fail while it is away (a
// counted dial error), and once it is back on its address an Open dials a
// new session. (TestRedialBackoff times the back-off in between.)
func TestKilledPeerIsRedialled(t *testing.T) {
	ca := peertest.NewCA(t)
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder())
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b"))
	if err := echoCheck(a, "dev-b", 1<<20, b); err != nil {
		t.Fatal(err)
	}
	b.kill(t)
	relaytest.Eventually(t, 5*time.Second, func() error {
		if n := a.metric(t, "tether_relay_peer_sessions", "direction=out"); n != 0 {
			return fmt.Errorf("%v sessions out after the peer died", n)
		}
		return nil
	})
	if _, err := a.open(t.Context(), b, "dev-b"); err == nil {
		t.Fatal("Open to a dead peer succeeded")
	}
	if got := a.metric(t, "tether_relay_peer_dial_errors_total"); got != 1 {
		t.Errorf("dial errors = %v, want 1", got)
	}

	b2 := startRelay(t, ca, "relay-b", b.addr, holder("dev-b"))
	relaytest.Eventually(t, 5*time.Second, func() error { return echoCheck(a, "dev-b", 1<<20, b2) })
	if n := len(b2.ln.taken()); n != 1 {
		t.Errorf("the peer back accepted %d connections, want 1", n)
	}
}

// TestForget: Forget closes the session (its streams fail) and the next
// Open dials a new one.
func TestForget(t *testing.T) {
	ca := peertest.NewCA(t)
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder())
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b"))
	st, err := a.open(t.Context(), b, "dev-b")
	if err != nil {
		t.Fatal(err)
	}
	if err := answer(st); err != nil {
		t.Fatal(err)
	}
	a.tr.Forget("relay-b")
	io.ReadAll(st) // ends (smux reads a stream of a closed session as EOF)
	if _, err := st.Write([]byte("more")); err == nil {
		t.Error("a stream of a forgotten peer still writes")
	}
	st.Close()
	if err := echoCheck(a, "dev-b", 1000, b); err != nil {
		t.Fatal(err)
	}
	if n := len(b.ln.taken()); n != 2 {
		t.Errorf("relay-b accepted %d connections, want 2", n)
	}
}

// TestBadPeerOpen: a stream that starts with another frame is refused
// with bad request and counted, and the session goes on.
func TestBadPeerOpen(t *testing.T) {
	ca := peertest.NewCA(t)
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", holder("dev-b"))
	sess := dialRaw(t, b.addr, ca.Peer(t, "relay-x"), ca.Pool(), "relay-b")
	st, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	frames.Write(st, &frames.StreamOpen{Service: "echo", ClientAddr: "203.0.113.7:40000"})
	err = answer(st)
	var refuse *frames.StreamRefuse
	if !errors.As(err, &refuse) || refuse.Code != frames.CodeBadRequest {
		t.Fatalf("stream without peer-open: %v, want a bad request refusal", err)
	}
	st.Close()
	if got := b.metric(t, "tether_relay_peer_streams_refused_total", "reason=bad_open"); got != 1 {
		t.Errorf("refused bad_open = %v, want 1", got)
	}
	st, err = sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	frames.Write(st, &frames.PeerOpen{DeviceID: "dev-b", Service: "echo", ClientAddr: "203.0.113.7:40000"})
	if got, err := exchange(st, []byte("after")); err != nil || string(got) != "after" {
		t.Fatalf("next stream: %q, %v", got, err)
	}
}

// TestCloseEndsEverything: Close returns with streams in flight in both
// directions and handlers blocked on them, Serve returns nil, and no
// goroutine of the package is left; Open fails after it.
func TestCloseEndsEverything(t *testing.T) {
	ca := peertest.NewCA(t)
	entered := make(chan struct{}, 8)
	waiting := func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
		frames.Write(st, &frames.StreamAccept{})
		entered <- struct{}{}
		io.Copy(io.Discard, st) // ends when the stream or session does
	}
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", waiting)
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", waiting)
	var streams []net.Conn
	for range 3 {
		ab, err := a.open(t.Context(), b, "dev-b")
		if err != nil {
			t.Fatal(err)
		}
		ba, err := b.open(t.Context(), a, "dev-a")
		if err != nil {
			t.Fatal(err)
		}
		ab.Write([]byte("in flight"))
		streams = append(streams, ab, ba)
		<-entered
		<-entered
	}
	a.close(t)()
	b.close(t)()
	if _, err := a.open(t.Context(), b, "dev-b"); !errors.Is(err, peer.ErrClosed) {
		t.Errorf("Open after Close: %v, want ErrClosed", err)
	}
	for _, st := range streams {
		st.Close()
	}
	if g := goroutines("tether/relay/peer."); g != "" {
		t.Errorf("goroutines left after Close:\n%s", g)
	}
	relaytest.Eventually(t, 5*time.Second, func() error { // smux's own exit after its conn closed
		if g := goroutines("xtaci/smux"); g != "" {
			return errors.New(g)
		}
		return nil
	})
}

// goroutines returns the stacks of goroutines running code of the given
// packages, the caller's excepted.
func goroutines(pkgs ...string) string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "runtime.Stack") {
			continue
		}
		for _, p := range pkgs {
			if strings.Contains(g, p) {
				out = append(out, g)
				break
			}
		}
	}
	return strings.Join(out, "\n\n")
}
