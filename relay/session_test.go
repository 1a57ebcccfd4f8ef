package relay_test

import (
	"context"
	"crypto/ed25519"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/replica"
	"github.com/xtaci/smux"
)

// The tests in this file drive relay sessions over net.Pipe in a synctest
// bubble, so the relay's timers (heartbeat deadline, handshake deadline,
// drain window) run on the bubble's clock: exact and instant.

// fakeControlPlane authorises every key and leases each HTTP service the
// hostname SERVICE-DEVICE.
type fakeControlPlane struct {
	mu          sync.Mutex
	generations map[string]uint64
	resets      int
}

func (f *fakeControlPlane) Enroll(context.Context, controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	return controlplane.EnrollResponse{}, controlplane.Errorf(controlplane.KindInvalid, "the fake does not enroll")
}

func (f *fakeControlPlane) Connect(_ context.Context, req controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	id := frames.DeviceID(req.PublicKey)
	f.generations[id]++
	return controlplane.ConnectResponse{DeviceID: id, Name: "dev" + strings.ToLower(id[:6]), Generation: f.generations[id]}, nil
}

func (f *fakeControlPlane) Register(_ context.Context, req controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	var out []controlplane.Lease
	for _, s := range req.Services {
		out = append(out, controlplane.Lease{DeviceID: req.DeviceID, Service: s.Name, Proto: s.Proto, Hostname: s.Name + "-" + req.DeviceID})
	}
	return out, nil
}

func (f *fakeControlPlane) Disconnect(context.Context, controlplane.DisconnectRequest) error {
	return nil
}

func (f *fakeControlPlane) Lookup(context.Context, controlplane.LookupRequest) (controlplane.Lease, error) {
	return controlplane.Lease{}, controlplane.Errorf(controlplane.KindNotFound, "no lease")
}

func (f *fakeControlPlane) ResetRelay(context.Context, string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resets++
	return nil
}

func (f *fakeControlPlane) Watch(context.Context, func(controlplane.DeviceEvent)) error { return nil }

func (f *fakeControlPlane) Snapshot(context.Context, controlplane.SnapshotRequest) (controlplane.SnapshotResponse, error) {
	return controlplane.SnapshotResponse{Epoch: "fake", Devices: []controlplane.DeviceRecord{}}, nil
}

func (f *fakeControlPlane) Hello(context.Context, controlplane.HelloRequest) (controlplane.HelloResponse, error) {
	return controlplane.HelloResponse{Epoch: "fake"}, nil
}

func (f *fakeControlPlane) Sync(_ context.Context, req controlplane.SyncRequest) (controlplane.SyncResponse, error) {
	return controlplane.SyncResponse{Sessions: req.Sessions}, nil
}

func (f *fakeControlPlane) Cert(context.Context, controlplane.CertRequest) (controlplane.CertResponse, error) {
	return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindUnavailable, "the fake has no CA")
}

func (f *fakeControlPlane) ServeRevocations(context.Context, string, func(context.Context, controlplane.RevokeNotice) error) error {
	return nil
}

// pipeRelay is a relay whose sessions run over net.Pipe.
type pipeRelay struct {
	srv     *relay.Server
	cp      *fakeControlPlane
	metrics *prometheus.Registry
	wg      sync.WaitGroup // sessions
}

// newPipeRelay starts a relay with a handshake timeout of 5s and a drain
// window of 4s, closed when the test ends.
func newPipeRelay(t *testing.T) *pipeRelay {
	p := &pipeRelay{cp: &fakeControlPlane{generations: map[string]uint64{}}, metrics: prometheus.NewRegistry()}
	rep, err := replica.Open(replica.Config{Path: filepath.Join(t.TempDir(), "relay.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	srv, err := relay.New(relay.Config{
		RelayID:          "relay-pipe",
		ControlPlane:     p.cp,
		Replica:          rep,
		HandshakeTimeout: 5 * time.Second,
		HeartbeatMin:     100 * time.Millisecond, // raw agents beat every second
		DrainWindow:      4 * time.Second,
		Logger:           slog.New(slog.NewTextHandler(t.Output(), nil)),
		Registerer:       p.metrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	p.srv = srv
	t.Cleanup(func() {
		srv.Close()
		p.wg.Wait()
	})
	return p
}

// connect runs a relay session over a pipe whose agent end is conn
// (nil: a plain pipe end). It returns the agent's smux session and a
// channel closed when the relay's session has ended.
func (p *pipeRelay) connect(t *testing.T, wrap func(net.Conn) net.Conn) (*smux.Session, <-chan struct{}) {
	relayEnd, agentEnd := net.Pipe()
	if wrap != nil {
		agentEnd = wrap(agentEnd)
	}
	cfg := wsmux.Config{}.Smux()
	server, err := smux.Server(relayEnd, cfg)
	if err != nil {
		t.Fatal(err)
	}
	client, err := smux.Client(agentEnd, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	ended := make(chan struct{})
	p.wg.Go(func() {
		defer close(ended)
		p.srv.RunSession(context.Background(), server, "pipe")
	})
	return client, ended
}

// handshake connects an agent with a new key and completes its handshake.
func (p *pipeRelay) handshake(t *testing.T, wrap func(net.Conn) net.Conn, svcs ...frames.Service) (*relaytest.RawAgent, <-chan struct{}) {
	mux, ended := p.connect(t, wrap)
	ra := relaytest.NewRawAgent(t, mux)
	_, key, _ := ed25519.GenerateKey(nil)
	ra.Handshake(t, key, svcs...)
	return ra, ended
}

func (p *pipeRelay) counter(t *testing.T, name, label string) float64 {
	v, err := relaytest.CounterValue(p.metrics, name, label)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// endsAt checks that ended is still open just before d from now and closed
// at d.
func endsAt(t *testing.T, ended <-chan struct{}, d time.Duration) {
	t.Helper()
	time.Sleep(d - time.Millisecond)
	synctest.Wait()
	select {
	case <-ended:
		t.Fatalf("session ended before %v", d)
	default:
	}
	time.Sleep(time.Millisecond)
	synctest.Wait()
	select {
	case <-ended:
	default:
		t.Fatalf("session still open after %v", d)
	}
}

func TestSilentAgentDeclaredDead(t *testing.T) {
	for _, beats := range []int{0, 2} {
		t.Run(map[int]string{0: "silent from the start", 2: "silent after two heartbeats"}[beats], func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := newPipeRelay(t)
				ra, ended := p.handshake(t, nil)
				for seq := range uint64(beats) {
					time.Sleep(2 * relaytest.RawHeartbeat) // late, but within three intervals
					ra.Send(t, &frames.Heartbeat{Seq: seq})
					if ack, ok := ra.Recv(t).(*frames.HeartbeatAck); !ok || ack.Seq != seq {
						t.Fatalf("heartbeat %d not answered", seq)
					}
				}
				endsAt(t, ended, 3*relaytest.RawHeartbeat)
				if got := ra.ClosedWith(t, time.Second); got != nil {
					t.Fatalf("a dead agent was sent %v", got)
				}
				if n := p.counter(t, "tether_relay_dead_sessions_total", ""); n != 1 {
					t.Fatalf("%v dead sessions counted, want 1", n)
				}
			})
		})
	}
}

func TestHandshakeDeadline(t *testing.T) {
	t.Run("no control stream", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPipeRelay(t)
			mux, ended := p.connect(t, nil)
			endsAt(t, ended, 5*time.Second)
			if _, err := mux.AcceptStream(); err == nil {
				t.Fatal("agent's connection still open")
			}
			if n := p.counter(t, "tether_relay_handshakes_total", "io"); n != 1 {
				t.Fatalf("%v failed handshakes counted, want 1", n)
			}
		})
	})
	t.Run("silent on the control stream", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPipeRelay(t)
			mux, ended := p.connect(t, nil)
			ra := relaytest.NewRawAgent(t, mux)
			endsAt(t, ended, 5*time.Second)
			if got := ra.ClosedWith(t, time.Second); got == nil || got.Code != frames.CodeBadRequest || !strings.Contains(got.Message, "expected hello") {
				t.Fatalf("got %v", got)
			}
			if n := p.counter(t, "tether_relay_handshakes_total", "bad request"); n != 1 {
				t.Fatalf("%v refused handshakes counted, want 1", n)
			}
		})
	})
}

// stallConn is an agent's end of the connection that, once stalled, reads
// nothing more: an agent that stopped reading while it still writes.
type stallConn struct {
	net.Conn
	stalled   chan struct{}
	closed    chan struct{}
	stallOnce sync.Once
	closeOnce sync.Once
}

func newStallConn(c net.Conn) *stallConn {
	return &stallConn{Conn: c, stalled: make(chan struct{}), closed: make(chan struct{})}
}

func (c *stallConn) stall() { c.stallOnce.Do(func() { close(c.stalled) }) }

func (c *stallConn) Read(b []byte) (int, error) {
	select {
	case <-c.stalled:
		<-c.closed
		return 0, net.ErrClosed
	default:
		return c.Conn.Read(b)
	}
}

func (c *stallConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// TestControlQueueFullClosesSession: an agent that keeps sending
// heartbeats but reads nothing fills its control queue; the relay closes
// the session (it cannot even take a heartbeat ack) and counts it.
func TestControlQueueFullClosesSession(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPipeRelay(t)
		var conn *stallConn
		ra, ended := p.handshake(t, func(c net.Conn) net.Conn { conn = newStallConn(c); return conn })
		conn.stall()
		for seq := range uint64(100) {
			if err := frames.Write(ra.Ctrl, &frames.Heartbeat{Seq: seq}); err != nil {
				break // the relay closed the session
			}
		}
		synctest.Wait()
		select {
		case <-ended:
		default:
			t.Fatal("session still open with its control queue full")
		}
		if n := p.counter(t, "tether_relay_control_queue_full_total", ""); n != 1 {
			t.Fatalf("%v full queues counted, want 1", n)
		}
	})
}

// TestDrainNoticesSpreadOverWindow: a draining relay asks its agents to
// move one after the other across its window, each given the rest of the
// window, and is done as soon as they have left.
func TestDrainNoticesSpreadOverWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newPipeRelay(t) // drain window 4s
		agents := []*relaytest.RawAgent{}
		for range 2 {
			ra, _ := p.handshake(t, nil)
			agents = append(agents, ra)
		}
		start := time.Now()
		var shutdown sync.WaitGroup
		var shutdownErr error
		shutdown.Go(func() { shutdownErr = p.srv.Shutdown(context.Background()) })

		type notice struct {
			agent  int
			at     time.Duration
			within time.Duration
		}
		notices := make(chan notice, len(agents))
		var readers sync.WaitGroup
		for i, ra := range agents {
			readers.Go(func() {
				m, err := frames.Read(ra.Ctrl, 0)
				if d, ok := m.(*frames.Drain); ok && err == nil {
					notices <- notice{i, time.Since(start), time.Duration(d.WithinMillis) * time.Millisecond}
				}
				ra.Mux.Close() // move at once
			})
		}
		readers.Wait()
		close(notices)
		var got []notice
		for n := range notices {
			got = append(got, n)
		}
		if len(got) != 2 || got[0].at != 0 || got[0].within != 4*time.Second || got[1].at != 2*time.Second || got[1].within != 2*time.Second {
			t.Fatalf("notices %+v, want one at 0s (within 4s) and one at 2s (within 2s)", got)
		}
		shutdown.Wait()
		if shutdownErr != nil {
			t.Fatal(shutdownErr)
		}
		if took := time.Since(start); took != 2*time.Second {
			t.Fatalf("shutdown took %v, want 2s: done when the last agent left", took)
		}
		if p.cp.resets != 1 {
			t.Fatalf("%d presence resets, want 1", p.cp.resets)
		}
	})
}
