package relaytest

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/xtaci/smux"
)

// RawHeartbeat is the heartbeat interval a RawAgent announces.
const RawHeartbeat = time.Second

// RawAgent speaks the agent's side of the protocol by hand, with frames
// over an smux session, to test what a real agent never does (bad
// signatures, replays, garbage, silence).
type RawAgent struct {
	Mux  *smux.Session
	Ctrl *smux.Stream // the control stream
	Key  ed25519.PrivateKey
	Pub  [32]byte
	// Version is the agent version Handshake announces; empty means "raw".
	Version string
}

// NewRawAgent opens the control stream on mux; mux is closed when the test ends.
func NewRawAgent(t testing.TB, mux *smux.Session) *RawAgent {
	t.Helper()
	t.Cleanup(func() { mux.Close() })
	ctrl, err := mux.OpenStream()
	if err != nil {
		t.Fatalf("open control stream: %v", err)
	}
	return &RawAgent{Mux: mux, Ctrl: ctrl}
}

// DialRaw connects a RawAgent to the relay at url (wss://host:port),
// trusting roots.
func DialRaw(t testing.TB, url string, roots *x509.CertPool) *RawAgent {
	t.Helper()
	mux, err := wsmux.Dial(t.Context(), url+frames.ConnectPath, wsmux.DialOptions{TLS: &tls.Config{RootCAs: roots}})
	if err != nil {
		t.Fatal(err)
	}
	return NewRawAgent(t, mux)
}

// EnrolledRaw connects a RawAgent to the env's relay and completes the
// handshake with key, registering svcs. A nil key means a new key,
// enrolled as name first.
func (e *Env) EnrolledRaw(t testing.TB, key ed25519.PrivateKey, name string, svcs ...frames.Service) *RawAgent {
	t.Helper()
	if key == nil {
		_, key, _ = ed25519.GenerateKey(nil)
		e.Enroll(t, key, name)
	}
	ra := DialRaw(t, e.RelayURL(), e.CA.Pool())
	ra.Handshake(t, key, svcs...)
	return ra
}

// Enroll enrolls key as device name through the control plane's NATS
// service, as a relay does: every relay learns of it.
func (e *Env) Enroll(t testing.TB, key ed25519.PrivateKey, name string) {
	t.Helper()
	if e.enroller == nil {
		nc, err := e.connect("relaytest enroller")
		if err != nil {
			t.Fatal(err)
		}
		e.T.Cleanup(nc.Close)
		e.enroller = &natsapi.Client{NC: nc}
	}
	req := controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(e.Token(1)), EnrollDevice: frames.EnrollDevice{PublicKey: key.Public().(ed25519.PublicKey), Name: name}}
	if _, err := e.enroller.Enroll(context.Background(), req); err != nil {
		t.Fatal(err)
	}
}

// Handshake runs the agent's side of the handshake with key (hello with
// Version and RawHeartbeat, signed challenge, register svcs) and returns
// the leases.
func (a *RawAgent) Handshake(t testing.TB, key ed25519.PrivateKey, svcs ...frames.Service) *frames.Leases {
	t.Helper()
	a.Key = key
	copy(a.Pub[:], key.Public().(ed25519.PublicKey))
	a.Send(t, &frames.Hello{PublicKey: a.Pub, AgentVersion: cmp.Or(a.Version, "raw"), HeartbeatMillis: uint32(RawHeartbeat / time.Millisecond)})
	ch, ok := a.Recv(t).(*frames.Challenge)
	if !ok {
		t.Fatal("no challenge")
	}
	a.Send(t, a.Sign(ch.Nonce, ch.RelayID))
	if _, ok := a.Recv(t).(*frames.Welcome); !ok {
		t.Fatal("no welcome")
	}
	a.Send(t, &frames.Register{Services: svcs})
	ls, ok := a.Recv(t).(*frames.Leases)
	if !ok {
		t.Fatal("no leases")
	}
	return ls
}

// Sign answers a challenge with the agent's key.
func (a *RawAgent) Sign(nonce [32]byte, relayID string) *frames.Auth {
	auth := &frames.Auth{}
	copy(auth.Signature[:], ed25519.Sign(a.Key, frames.AuthMessage(nonce, a.Pub, relayID)))
	return auth
}

// Send writes one frame on the control stream.
func (a *RawAgent) Send(t testing.TB, m frames.Message) {
	t.Helper()
	if err := frames.Write(a.Ctrl, m); err != nil {
		t.Fatal(err)
	}
}

// Recv reads the next frame from the relay, failing after 10s.
func (a *RawAgent) Recv(t testing.TB) frames.Message {
	t.Helper()
	a.Ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := frames.Read(a.Ctrl, 0)
	if err != nil {
		t.Fatalf("read from relay: %v", err)
	}
	return m
}

// ClosedWith waits for the relay to end the session and returns its last
// error frame (nil if it sent none), failing if the session is still
// open after within.
func (a *RawAgent) ClosedWith(t testing.TB, within time.Duration) *frames.Error {
	t.Helper()
	var last *frames.Error
	a.Ctrl.SetReadDeadline(time.Now().Add(within))
	for {
		m, err := frames.Read(a.Ctrl, 0)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("session still open after %v", within)
			}
			return last
		}
		if e, ok := m.(*frames.Error); ok {
			last = e
		}
	}
}

// KeepAlive sends the heartbeats the agent announced (three per
// RawHeartbeat) and reads the control stream from now on, until the test
// ends, for tests that outlast three heartbeat intervals.
func (a *RawAgent) KeepAlive(t testing.TB) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			if _, err := frames.Read(a.Ctrl, 0); err != nil {
				return
			}
		}
	})
	wg.Go(func() {
		tick := time.NewTicker(RawHeartbeat / 3)
		defer tick.Stop()
		for seq := uint64(1); ; seq++ {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if frames.WriteTimeout(a.Ctrl, &frames.Heartbeat{Seq: seq}, time.Second) != nil {
				return
			}
		}
	})
	t.Cleanup(func() {
		close(done)
		a.Mux.Close()
		wg.Wait()
	})
}

// ServeStreams accepts every data stream the relay opens and calls handle
// with its StreamOpen, each in a goroutine of its own, until the test ends
// (the session is closed then, and the handlers waited for). A stream
// whose StreamOpen cannot be read is closed; handle closes the others.
func (a *RawAgent) ServeStreams(t testing.TB, handle func(open *frames.StreamOpen, st *smux.Stream)) {
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			st, err := a.Mux.AcceptStream()
			if err != nil {
				return
			}
			wg.Go(func() {
				open, err := frames.ReadAs[*frames.StreamOpen](st, 4096)
				if err != nil {
					st.Close()
					return
				}
				handle(open, st)
			})
		}
	})
	t.Cleanup(func() {
		a.Mux.Close()
		wg.Wait()
	})
}

// ServeHTTP accepts every data stream the relay opens, whatever service it
// names, and serves h on it, until the test ends.
func (a *RawAgent) ServeHTTP(t testing.TB, h http.Handler) {
	ln := &streamListener{conns: make(chan net.Conn), done: make(chan struct{}), addr: a.Mux.LocalAddr()}
	srv := &http.Server{Handler: h}
	var wg sync.WaitGroup
	wg.Go(func() { srv.Serve(ln) })
	wg.Go(func() {
		for {
			st, err := a.Mux.AcceptStream()
			if err != nil {
				return
			}
			_, err = frames.ReadAs[*frames.StreamOpen](st, 4096)
			if err == nil {
				err = frames.Write(st, &frames.StreamAccept{})
			}
			if err != nil {
				st.Close()
				continue
			}
			select {
			case ln.conns <- st:
			case <-ln.done:
				st.Close()
				return
			}
		}
	})
	t.Cleanup(func() {
		a.Mux.Close()
		srv.Close()
		wg.Wait()
	})
}

// streamListener hands accepted data streams to an http.Server.
type streamListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	addr  net.Addr
}

func (l *streamListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *streamListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *streamListener) Addr() net.Addr { return l.addr }
