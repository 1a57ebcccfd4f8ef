// Package controlplanetest runs a real control plane for tests: NATS with
// Tether's users and permissions (in-process, or three servers routed on
// loopback), the daemon on a temp dir, and relay-side clients; plus
// devices that sign handshakes as agents do.
package controlplanetest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

// Options tune an Env. The zero value is fine.
type Options struct {
	// Cluster runs three NATS servers routed on loopback, listening,
	// instead of one in-process server; the control plane connects to the
	// first.
	Cluster bool
	// ReleaseKeys are the release keys the control plane trusts
	// (releases.go: NewReleaseKey).
	ReleaseKeys release.Keys
	// Daemon is applied to the control plane's config before it starts.
	Daemon func(*daemon.Config)
	// Logger; nil logs to the test's output.
	Logger *slog.Logger
}

// Env is a running control plane.
type Env struct {
	T       testing.TB
	DataDir string
	CP      *daemon.Daemon
	CPConn  *nats.Conn
	Logger  *slog.Logger
	// One of these is set.
	NATS        *natsembed.Server
	NATSCluster *natsembed.Cluster
}

// Start starts a control plane and registers its shutdown with t.Cleanup.
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	e := &Env{T: t, DataDir: t.TempDir(), Logger: opts.Logger}
	if e.Logger == nil {
		e.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	var err error
	if opts.Cluster {
		if e.NATSCluster, err = natsembed.StartCluster(3, nil); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.NATSCluster.Shutdown)
	} else {
		if e.NATS, err = natsembed.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.NATS.Shutdown)
	}
	e.CPConn = e.Connect(natsperm.ControlPlane, 0, "controlplane")
	cfg := daemon.Config{DataDir: e.DataDir, Domain: "localhost", CertDomains: []string{"localhost"}, ClaimWait: 50 * time.Millisecond, Logger: e.Logger.With("component", "controlplane")}
	cfg.ReleaseKeys = opts.ReleaseKeys
	if opts.Daemon != nil {
		opts.Daemon(&cfg)
	}
	if e.CP, err = daemon.Start(context.Background(), e.CPConn, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.CP.Close() })
	return e
}

// Connect opens a NATS connection as role (to node i of a cluster), closed
// when the test ends.
func (e *Env) Connect(role natsperm.Role, node int, name string, more ...nats.Option) *nats.Conn {
	e.T.Helper()
	var nc *nats.Conn
	var err error
	if e.NATSCluster != nil {
		s := e.NATSCluster.Nodes[node]
		nc, err = natsapi.Connect(s.ClientURL(), s.Auth(role), role, name, nil, more...)
		if err == nil {
			err = waitConnected(nc)
		}
	} else {
		nc, err = e.NATS.ConnectAs(role, name, more...)
	}
	if err != nil {
		e.T.Fatal(err)
	}
	e.T.Cleanup(nc.Close)
	return nc
}

func waitConnected(nc *nats.Conn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return nc.FlushWithContext(ctx)
}

// Relay returns a relay's client of the control plane (on node i of a
// cluster), and waits until the control plane's endpoints are reachable
// from there.
func (e *Env) Relay(node int, id string) *natsapi.Client {
	e.T.Helper()
	c := &natsapi.Client{NC: e.Connect(natsperm.Relay, node, "relay "+id)}
	e.WaitInterest(controlplane.SubjectConnect)
	return c
}

// WaitInterest waits until every NATS server knows of a subscriber to
// subject (interest crosses routes asynchronously).
func (e *Env) WaitInterest(subject string) {
	e.T.Helper()
	if e.NATSCluster == nil {
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, s := range e.NATSCluster.Nodes {
		for !s.NATSServer().GlobalAccount().SubscriptionInterest(subject) {
			if time.Now().After(deadline) {
				e.T.Fatalf("no interest in %s on %s after 10s", subject, s.ClientURL())
			}
			time.Sleep(5 * time.Millisecond) // polling the server's interest table
		}
	}
}

// Token creates an enrollment token and returns it.
func (e *Env) Token() string {
	e.T.Helper()
	tok, _, err := e.CP.Store.CreateToken(context.Background(), 1000, time.Hour, nil)
	if err != nil {
		e.T.Fatal(err)
	}
	return tok
}

// Device is a device's key pair, as an agent holds it.
type Device struct {
	Name string
	ID   string
	Pub  ed25519.PublicKey
	Priv ed25519.PrivateKey
}

// NewDevice makes a device key.
func NewDevice(name string) Device {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	return Device{Name: name, ID: frames.DeviceID(pub), Pub: pub, Priv: priv}
}

// Enroll enrolls a new device through relay c.
func (e *Env) Enroll(c *natsapi.Client, name string) Device {
	e.T.Helper()
	d := NewDevice(name)
	if _, err := c.Enroll(context.Background(), controlplane.EnrollRequest{
		TokenHash: controlplane.TokenHash(e.Token()), EnrollDevice: frames.EnrollDevice{PublicKey: d.Pub, Name: name},
	}); err != nil {
		e.T.Fatal(err)
	}
	return d
}

// Handshake is the connect request of relayID after the device signed
// a fresh challenge of that relay, as an agent does.
func (d Device) Handshake(relayID string) controlplane.ConnectRequest {
	var nonce [32]byte
	rand.Read(nonce[:])
	req := controlplane.ConnectRequest{PublicKey: d.Pub, RelayID: relayID, Nonce: nonce}
	copy(req.Signature[:], ed25519.Sign(d.Priv, frames.AuthMessage(nonce, [32]byte(d.Pub), relayID)))
	return req
}

// Events collects the device events a relay watches.
type Events struct {
	C chan controlplane.DeviceEvent
}

// Watch starts collecting c's events until the test ends.
func Watch(t testing.TB, c *natsapi.Client) *Events {
	t.Helper()
	ev := &Events{C: make(chan controlplane.DeviceEvent, 4096)}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := c.Watch(ctx, func(e controlplane.DeviceEvent) { ev.C <- e }); err != nil {
		t.Fatal(err)
	}
	return ev
}

// Next returns the next event, failing the test after 10s.
func (ev *Events) Next(t testing.TB) controlplane.DeviceEvent {
	t.Helper()
	select {
	case e := <-ev.C:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no device event within 10s")
		return controlplane.DeviceEvent{}
	}
}

// Until returns the events up to and including the first of kind.
func (ev *Events) Until(t testing.TB, kind string) []controlplane.DeviceEvent {
	t.Helper()
	var out []controlplane.DeviceEvent
	for {
		e := ev.Next(t)
		out = append(out, e)
		if e.Kind == kind {
			return out
		}
	}
}
