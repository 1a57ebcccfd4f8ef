// Package relaytest runs Tether in-process for tests and benchmarks.
// Start runs a complete server: an embedded NATS server, a control plane on
// bbolt in a temp dir, and a relay on loopback listeners whose certificates
// come from the control plane's cluster CA (AddRelay adds relays on
// 127.0.0.2, .3, …). StartCluster runs a cluster as three hosts would: a
// three-server NATS cluster with Tether's users, the control plane, and
// relays on 127.0.0.1, .2, .3 that can be killed, restarted and cut off.
// RawAgent speaks the agent's side of the protocol frame by frame, for
// tests of what a real agent never does.
//
// It does not import package agent: tests that run the real agent build
// its Config from RelayURL and CA.Pool themselves.
package relaytest

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/devca"
)

// Options tune an Env. The zero value is fine.
type Options struct {
	// RelayConfig is applied to the relay's config before it starts.
	RelayConfig func(*relay.Config)
	// Logger; nil logs to the test's output.
	Logger *slog.Logger
	// HelloInterval is the relays' and the control plane's. Zero means 1s
	// (a relay silent for 3s is down).
	HelloInterval time.Duration
	// TCPPorts is how many ports TCP leases come from. Zero means 16.
	TCPPorts int
	// ReleaseKeys are the control plane's release keys: a release
	// published on it (Env.CP.Releases) must be signed with one. Relays
	// offer its rollouts when RelayConfig sets their Releases (to their
	// ControlPlane, a natsapi.Client). Nil means releases are refused.
	ReleaseKeys release.Keys
}

// Env is a running Tether server.
type Env struct {
	T        testing.TB
	DataDir  string
	Domain   string
	CA       *devca.CA // the cluster root (the control plane's ca.pem), which agents trust
	TCPPorts controlplane.PortRange
	NATS     *natsembed.Server
	CP       *daemon.Daemon
	Relay    *relay.Server        // the first relay's; nil while it is stopped
	Metrics  *prometheus.Registry // the first relay's metrics
	Logger   *slog.Logger
	// HelloInterval is the relays' and the control plane's.
	HelloInterval time.Duration

	opts      Options
	cpNC      *nats.Conn
	main      *Node   // the first relay
	added     []*Node // by AddRelay
	cpStopped bool
	connect   func(name string) (*nats.Conn, error) // a NATS connection as a relay
	enroller  *natsapi.Client                       // see Enroll
}

// Start starts a server and registers its shutdown with t.Cleanup.
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	e := newEnv(t, opts)
	var err error
	if e.NATS, err = natsembed.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.NATS.Shutdown)
	e.connect = func(name string) (*nats.Conn, error) { return e.NATS.ConnectAs(natsperm.Relay, name) }
	cpNC, err := e.NATS.ConnectAs(natsperm.ControlPlane, "controlplane")
	if err != nil {
		t.Fatal(err)
	}
	e.startControlPlane(cpNC)
	e.main = e.newNode("relay-test", "127.0.0.1", e.connect)
	e.StartRelay()
	t.Cleanup(e.StopRelay)
	return e
}

// newEnv sets up what every Env has before its NATS starts.
func newEnv(t testing.TB, opts Options) *Env {
	e := &Env{T: t, DataDir: t.TempDir(), Domain: "localhost", opts: opts, Logger: opts.Logger, HelloInterval: cmp.Or(opts.HelloInterval, time.Second)}
	if e.Logger == nil {
		e.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	e.TCPPorts = FreePortRange(t, cmp.Or(opts.TCPPorts, 16))
	return e
}

// startControlPlane starts the control plane on nc, its connection for
// the whole test, and loads the cluster root.
func (e *Env) startControlPlane(nc *nats.Conn) {
	e.T.Helper()
	e.cpNC = nc
	e.T.Cleanup(nc.Close)
	e.StartControlPlane()
	e.T.Cleanup(e.StopControlPlane)
	// The control plane's cluster root, which every relay's certificates
	// chain to (its key too: tests may issue with it).
	var err error
	if e.CA, err = devca.LoadOrCreate(e.DataDir); err != nil {
		e.T.Fatal(err)
	}
}

// StartControlPlane starts the control plane (again), on the same data
// dir and NATS connection.
func (e *Env) StartControlPlane() {
	e.T.Helper()
	cp, err := daemon.Start(context.Background(), e.cpNC, daemon.Config{
		DataDir: e.DataDir, TCPPorts: e.TCPPorts, Domain: e.Domain, ClaimWait: 50 * time.Millisecond,
		HelloInterval: e.HelloInterval, ReleaseKeys: e.opts.ReleaseKeys, Logger: e.Logger.With("component", "controlplane"),
	})
	if err != nil {
		e.T.Fatal(err)
	}
	e.CP, e.cpStopped = cp, false
}

// StopControlPlane stops the control plane, as a crash would for the
// relays: its requests go unanswered. CP stays set, its store closed.
func (e *Env) StopControlPlane() {
	if e.cpStopped {
		return
	}
	e.cpStopped = true
	if err := e.CP.Close(); err != nil {
		e.T.Errorf("stop the control plane: %v", err)
	}
}

// StartRelay starts the first relay (again) on the same addresses.
func (e *Env) StartRelay() {
	e.main.Start()
	e.Relay, e.Metrics = e.main.Relay, e.main.Metrics
}

// Counter returns the value of a counter of the relay's metrics with the
// given label value (any label; empty means all series), or 0.
func (e *Env) Counter(name, labelValue string) float64 {
	v, err := CounterValue(e.Metrics, name, labelValue)
	if err != nil {
		e.T.Fatal(err)
	}
	return v
}

// CounterValue sums the counters called name in g whose series carry
// labelValue (any label; empty means all series).
func CounterValue(g prometheus.Gatherer, name, labelValue string) (float64, error) {
	mfs, err := g.Gather()
	if err != nil {
		return 0, fmt.Errorf("gather metrics: %w", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := labelValue == ""
			for _, l := range m.GetLabel() {
				match = match || l.GetValue() == labelValue
			}
			if match {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum, nil
}

// AddRelay starts another relay of the cluster, on its own loopback
// address for TCP leases (every relay listens on every leased port); it is
// stopped when the test ends.
func (e *Env) AddRelay(id string) *Node {
	n := e.newNode(id, "127.0.0."+strconv.Itoa(2+len(e.added)), e.connect)
	e.added = append(e.added, n)
	n.Start()
	return n
}

// StopRelay drains and stops the first relay and its listeners.
func (e *Env) StopRelay() {
	if e.Relay == nil {
		return
	}
	e.main.Stop(e.T)
	e.Relay = nil
}

// KillRelay stops the first relay at once, without draining (a crash).
func (e *Env) KillRelay() {
	e.main.Kill()
	e.Relay = nil
}

// RelayURL is the wss:// URL agents connect to.
func (e *Env) RelayURL() string { return e.main.URL() }

// HTTPSAddr and HTTPAddr are the first relay's listener addresses.
func (e *Env) HTTPSAddr() string { return e.main.HTTPSAddr }
func (e *Env) HTTPAddr() string  { return e.main.HTTPAddr }

// Token creates an enrollment token.
func (e *Env) Token(uses int) string {
	tok, _, err := e.CP.Store.CreateToken(context.Background(), uses, time.Hour, map[string]string{"env": "test"})
	if err != nil {
		e.T.Fatal(err)
	}
	return tok
}

// Client returns an HTTP client that trusts the cluster root and sends
// every request to the first relay, whatever the URL's host (as DNS for
// *.localhost would).
func (e *Env) Client() *http.Client { return e.main.Client() }

// Get fetches https://host/path (tls) or http://host/path through the
// first relay and returns the status and body.
func (e *Env) Get(tls bool, host, path string) (int, string) {
	e.T.Helper()
	return e.main.Get(tls, host, path)
}

// AwaitPage polls GET through the first relay (as Get does) until the
// answer has status and a body containing says, failing after within: for
// a route that changes when a session comes or goes.
func (e *Env) AwaitPage(tls bool, host, path string, status int, says string, within time.Duration) {
	e.T.Helper()
	e.main.AwaitPage(tls, host, path, status, says, within)
}

// FreePortRange finds n consecutive free loopback ports for TCP leases.
func FreePortRange(t testing.TB, n int) controlplane.PortRange {
	t.Helper()
	for range 100 {
		first := 30000 + rand.IntN(25000)
		ok := true
		var lns []net.Listener
		for p := first; p < first+n; p++ {
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				ok = false
				break
			}
			lns = append(lns, ln)
		}
		for _, ln := range lns {
			ln.Close()
		}
		if ok {
			return controlplane.PortRange{First: uint16(first), Last: uint16(first + n - 1)}
		}
	}
	t.Fatal("no free port range")
	return controlplane.PortRange{}
}

// Eventually polls cond until it holds or timeout passes (nats-server's
// checkFor): for state that has no event to wait on.
func Eventually(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CheckLeaks fails if goroutines of Tether, smux or the WebSocket library
// are still running after the tests of a package; call it from TestMain.
func CheckLeaks(m *testing.M) int {
	code := m.Run()
	if code != 0 {
		return code
	}
	var leaked string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		leaked = ourGoroutines()
		if leaked == "" {
			return 0
		}
	}
	fmt.Fprintf(os.Stderr, "leaked goroutines:\n%s\n", leaked)
	return 1
}

func ourGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "CheckLeaks") || strings.Contains(g, "testing.(*M)") {
			continue
		}
		for _, pkg := range []string{"tetherfleet/tether/", "xtaci/smux", "coder/websocket"} {
			if strings.Contains(g, pkg) {
				out = append(out, g)
				break
			}
		}
	}
	return strings.Join(out, "\n\n")
}

// RunWithLeakCheck runs the package's tests, then fails the run if
// goroutines of ours are left behind. Use it as TestMain.
func RunWithLeakCheck(m *testing.M) { os.Exit(CheckLeaks(m)) }

// LineService is a device's local TCP service for tests: it answers each
// line upper-cased and, when the client half-closes, writes "bye" and
// closes. It returns the service's address.
func LineService(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "%s\n", strings.ToUpper(sc.Text()))
				}
				io.WriteString(c, "bye\n")
			}()
		}
	}()
	return ln.Addr().String()
}
