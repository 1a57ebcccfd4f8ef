package relaytest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/replica"
)

// Node is one relay of a test cluster: its own data dir (replica,
// certificates), its own loopback address for its listeners and TCP
// leases, its own NATS connection. It keeps its addresses across
// restarts.
type Node struct {
	ID      string
	Host    string // loopback address of its listeners and TCP leases, e.g. "127.0.0.2"
	DataDir string
	// Set while the relay runs (nil once it is stopped or killed).
	Relay   *relay.Server
	Replica *replica.Replica
	Metrics *prometheus.Registry
	Certs   *relay.Certs
	// Fixed at the first start, the same after a restart.
	HTTPSAddr, HTTPAddr, ClusterAddr string

	env     *Env
	connect func(name string) (*nats.Conn, error)
	nc      *nats.Conn
	servers []*http.Server
	serving sync.WaitGroup
}

// newNode prepares relay id on host, connecting to NATS with connect;
// Start starts it.
func (e *Env) newNode(id, host string, connect func(name string) (*nats.Conn, error)) *Node {
	n := &Node{ID: id, Host: host, DataDir: filepath.Join(e.DataDir, "relays", id), env: e, connect: connect,
		HTTPSAddr: net.JoinHostPort(host, "0"), HTTPAddr: net.JoinHostPort(host, "0"), ClusterAddr: net.JoinHostPort(host, "0")}
	e.T.Cleanup(func() {
		if n.Relay != nil {
			n.Kill()
		}
	})
	return n
}

// URL is the node's wss:// URL for agents.
func (n *Node) URL() string { return "wss://" + n.HTTPSAddr }

// Counter returns the sum of the relay's counters called name whose
// series carry labelValue (empty: all series), as Env.Counter does.
func (n *Node) Counter(name, labelValue string) float64 {
	v, err := CounterValue(n.Metrics, name, labelValue)
	if err != nil {
		n.env.T.Fatal(err)
	}
	return v
}

// NATSConnected reports whether the relay's NATS connection is up (false
// while it is stopped), as its /readyz asks.
func (n *Node) NATSConnected() bool { return n.nc != nil && n.nc.IsConnected() }

// Start starts the relay (again), on the same addresses as before.
func (n *Node) Start() {
	t := n.env.T
	t.Helper()
	if n.Relay != nil {
		t.Fatalf("relay %s is running", n.ID)
	}
	log := n.env.Logger.With("component", "relay", "relay_id", n.ID)
	var err error
	if n.nc, err = n.connect("relay " + n.ID); err != nil {
		t.Fatal(err)
	}
	cp := &natsapi.Client{NC: n.nc}
	if err := os.MkdirAll(n.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if n.Replica, err = replica.Open(replica.Config{Path: filepath.Join(n.DataDir, "relay.db"), Logger: log}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n.Certs, err = relay.LoadCerts(ctx, relay.CertConfig{
		RelayID: n.ID, DataDir: n.DataDir, ControlPlane: cp, Public: true, Domain: n.env.Domain, Hosts: []string{n.Host}, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.Metrics = prometheus.NewRegistry()
	cluster := listen(t, &n.ClusterAddr)
	cfg := relay.Config{
		RelayID:          n.ID,
		Domain:           n.env.Domain,
		ControlPlane:     cp,
		Replica:          n.Replica,
		TCPHost:          n.Host,
		TCPPorts:         n.env.TCPPorts,
		HandshakeTimeout: 5 * time.Second,
		HeartbeatMin:     100 * time.Millisecond, // tests' agents beat fast to be declared dead fast
		// Tests poll the release endpoints from one address; the limit's
		// own test sets relay.DefaultReleaseLimit.
		ReleaseLimit:  relay.RateLimit{PerSecond: -1},
		DrainWindow:   time.Second,
		HelloInterval: n.env.HelloInterval,
		ClusterAddr:   n.ClusterAddr,
		PeerCert:      &n.Certs.Peer,
		PeerRoots:     n.Certs.Roots(),
		Logger:        log,
		Registerer:    n.Metrics,
	}
	if n.env.opts.RelayConfig != nil {
		n.env.opts.RelayConfig(&cfg)
	}
	if n.Relay, err = relay.New(cfg); err != nil {
		cluster.Close()
		t.Fatal(err)
	}
	if err := n.Relay.Start(ctx); err != nil {
		t.Fatal(err)
	}
	rl := n.Relay
	n.nc.SetReconnectHandler(func(*nats.Conn) { rl.Resync() })
	https := listen(t, &n.HTTPSAddr)
	plain := listen(t, &n.HTTPAddr)
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	hs := n.Relay.HTTPSServer(n.Certs.TLS, errLog)
	ps := n.Relay.HTTPServer(errLog)
	n.servers = []*http.Server{hs, ps}
	n.serving.Go(func() { hs.ServeTLS(https, "", "") })
	n.serving.Go(func() { ps.Serve(plain) })
	n.serving.Go(func() { rl.ServePeers(context.Background(), cluster) }) // until the relay stops
}

// Stop drains the relay (its agents are told to move) and stops it.
func (n *Node) Stop(t testing.TB) {
	t.Helper()
	if n.Relay == nil {
		return
	}
	n.closeServers()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Relay.Shutdown(ctx); err != nil {
		t.Errorf("relay %s shutdown: %v", n.ID, err)
	}
	n.serving.Wait()
	n.release()
}

// Kill stops the relay at once, as a crash does: its listeners and every
// connection close, nothing is drained and the control plane is not told.
func (n *Node) Kill() {
	if n.Relay == nil {
		return
	}
	n.closeServers()
	n.Relay.Close()
	n.serving.Wait()
	n.release()
}

func (n *Node) closeServers() {
	for _, s := range n.servers {
		s.Close()
	}
}

func (n *Node) release() {
	n.nc.Close()
	n.Replica.Close()
	n.Relay, n.servers, n.nc = nil, nil, nil
}

// listen listens on *addr and sets it to the address bound (a port 0
// becomes the one chosen).
func listen(t testing.TB, addr *string) net.Listener {
	t.Helper()
	var ln net.Listener
	var err error
	// The port of a just-closed listener can take a moment to be free again.
	for range 50 {
		if ln, err = net.Listen("tcp", *addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(fmt.Errorf("listen on %s: %w", *addr, err))
	}
	*addr = ln.Addr().String()
	return ln
}

// Client returns an HTTP client that trusts the cluster root and sends
// every request to this relay, whatever the URL's host (as DNS for
// *.localhost would): port 443 to its HTTPS listener, others to HTTP.
func (n *Node) Client() *http.Client {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		target := n.HTTPAddr
		if strings.HasSuffix(addr, ":443") {
			target = n.HTTPSAddr
		}
		return (&net.Dialer{}).DialContext(ctx, network, target)
	}
	return &http.Client{Transport: &http.Transport{
		DialContext:       dial,
		TLSClientConfig:   &tls.Config{RootCAs: n.env.CA.Pool()},
		DisableKeepAlives: true,
	}}
}

// Get fetches https://host/path (tls) or http://host/path through this
// relay and returns the status and body (status 0 and the error when the
// request fails).
func (n *Node) Get(tls bool, host, path string) (int, string) {
	scheme := "http"
	if tls {
		scheme = "https"
	}
	resp, err := n.Client().Get(scheme + "://" + host + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// AwaitPage polls GET through this relay until the answer has status and
// a body containing says, failing after within.
func (n *Node) AwaitPage(tls bool, host, path string, status int, says string, within time.Duration) {
	n.env.T.Helper()
	Eventually(n.env.T, within, func() error {
		if code, body := n.Get(tls, host, path); code != status || !strings.Contains(body, says) {
			return fmt.Errorf("relay %s: %s%s: %d %s, want %d saying %q", n.ID, host, path, code, body, status, says)
		}
		return nil
	})
}
