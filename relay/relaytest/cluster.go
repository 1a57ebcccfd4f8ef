package relaytest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// Cluster is a Tether cluster on loopback, as three hosts would run it: a
// real NATS cluster of three servers routed to each other, with Tether's
// users and permissions, one control plane, and relays each with its own
// data dir, its own address (relay i listens on 127.0.0.(i+1): HTTP,
// HTTPS, cluster listener, TCP leases) and its own NATS connection, which
// prefers NATS server i%3 and fails over to the others. The relays'
// certificates all chain to the control plane's root (Env.CA).
//
// The embedded Env's helpers (Token, Enroll, EnrolledRaw, CP, Client and
// Get through the first relay, StopControlPlane and StartControlPlane)
// work as they do for Start.
type Cluster struct {
	*Env
	// Relays are the relays, relay-1 first. Kill, Start and Stop them.
	Relays []*Node

	natsCfgs  []natsembed.Config
	natsNodes []*natsembed.Server // nil while a node is stopped
}

// StartCluster starts a NATS cluster of three servers, the control plane
// and n relays (relay-1 … relay-n), all stopped when the test ends.
func StartCluster(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	c := &Cluster{Env: newEnv(t, opts)}
	c.startNATS(3)
	t.Cleanup(c.stopNATS)
	c.connect = func(name string) (*nats.Conn, error) { return c.Connect(natsperm.Relay, 0, name) }
	cpNC, err := c.Connect(natsperm.ControlPlane, 0, "controlplane")
	if err != nil {
		t.Fatal(err)
	}
	c.startControlPlane(cpNC)
	c.WaitInterest(controlplane.SubjectConnect)
	for i := range n {
		pref := i % len(c.natsCfgs)
		node := c.newNode(fmt.Sprintf("relay-%d", i+1), fmt.Sprintf("127.0.0.%d", i+1),
			func(name string) (*nats.Conn, error) { return c.Connect(natsperm.Relay, pref, name) })
		node.Start()
		c.Relays = append(c.Relays, node)
	}
	c.main = c.Relays[0]
	c.Relay, c.Metrics = c.main.Relay, c.main.Metrics
	return c
}

// startNATS starts n NATS servers on loopback, each routed to every
// other, and waits until they form one cluster. Each keeps its ports, so
// a node stopped and started again rejoins.
func (c *Cluster) startNATS(n int) {
	t := c.T
	passwords := map[natsperm.Role]string{}
	for _, r := range natsperm.Roles {
		passwords[r] = randomHex()
	}
	routePass := randomHex()
	clients, routes := make([]string, n), make([]string, n)
	for i := range n {
		clients[i], routes[i] = freeAddr(t), freeAddr(t)
	}
	for i := range n {
		cfg := natsembed.Config{
			Name: fmt.Sprintf("tether-nats-%d", i+1), Listen: clients[i], Passwords: passwords,
			ClusterListen: routes[i], RoutePassword: routePass,
		}
		for j := range n {
			if j != i {
				cfg.Routes = append(cfg.Routes, "nats-route://"+routes[j])
			}
		}
		c.natsCfgs = append(c.natsCfgs, cfg)
		c.natsNodes = append(c.natsNodes, nil)
		c.StartNATSNode(i)
	}
	c.awaitRoutes()
}

// StopNATSNode shuts NATS server i down; its clients fail over to the
// other servers.
func (c *Cluster) StopNATSNode(i int) {
	if s := c.natsNodes[i]; s != nil {
		s.Shutdown()
		c.natsNodes[i] = nil
	}
}

// StartNATSNode starts NATS server i (again, on the same ports) and waits
// until it has its routes to the running servers.
func (c *Cluster) StartNATSNode(i int) {
	c.T.Helper()
	var err error
	// Its ports may take a moment to be free again after a shutdown.
	for range 50 {
		if c.natsNodes[i], err = natsembed.StartConfig(c.natsCfgs[i]); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		c.T.Fatalf("start NATS server %d: %v", i+1, err)
	}
	c.awaitRoutes()
}

// BounceNATSNode stops NATS server i and starts it again.
func (c *Cluster) BounceNATSNode(i int) {
	c.StopNATSNode(i)
	c.StartNATSNode(i)
}

// RestartNATS stops every NATS server, then starts them all again: every
// client loses NATS for a moment.
func (c *Cluster) RestartNATS() {
	for i := range c.natsNodes {
		c.StopNATSNode(i)
	}
	for i := range c.natsNodes {
		c.StartNATSNode(i)
	}
}

func (c *Cluster) stopNATS() {
	for i := range c.natsNodes {
		c.StopNATSNode(i)
	}
}

// awaitRoutes waits until every running server has a route to every other
// running one.
func (c *Cluster) awaitRoutes() {
	c.T.Helper()
	Eventually(c.T, 10*time.Second, func() error {
		running := 0
		for _, s := range c.natsNodes {
			if s != nil {
				running++
			}
		}
		for i, s := range c.natsNodes {
			if s != nil && s.NATSServer().NumRoutes() < running-1 {
				return fmt.Errorf("NATS server %d has %d routes, want %d", i+1, s.NATSServer().NumRoutes(), running-1)
			}
		}
		return nil
	})
}

// Connect opens a NATS connection as role, preferring server pref (the
// others follow, in order, for failover), and waits until it is connected.
func (c *Cluster) Connect(role natsperm.Role, pref int, name string) (*nats.Conn, error) {
	n := len(c.natsCfgs)
	urls := make([]string, 0, n)
	for k := range n {
		urls = append(urls, "nats://"+c.natsCfgs[(pref+k)%n].Listen)
	}
	auth := natsapi.Auth{User: role.User(), Password: c.natsCfgs[0].Passwords[role]}
	nc, err := natsapi.Connect(strings.Join(urls, ","), auth, role, name, c.Logger.With("component", "nats", "client", name),
		nats.DontRandomize(), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := nc.FlushWithContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("connect to NATS as %s: %w", name, err)
	}
	return nc, nil
}

// WaitInterest waits until every running NATS server knows of a
// subscriber to subject (interest crosses routes asynchronously).
func (c *Cluster) WaitInterest(subject string) {
	c.T.Helper()
	Eventually(c.T, 10*time.Second, func() error {
		for i, s := range c.natsNodes {
			if s != nil && !s.NATSServer().GlobalAccount().SubscriptionInterest(subject) {
				return fmt.Errorf("no interest in %s on NATS server %d", subject, i+1)
			}
		}
		return nil
	})
}

// Node returns the relay with this ID, failing the test if there is none.
func (c *Cluster) Node(id string) *Node {
	for _, n := range c.Relays {
		if n.ID == id {
			return n
		}
	}
	c.T.Fatalf("no relay %s", id)
	return nil
}

// URLs are the relays' wss:// URLs, for an agent's failover list.
func (c *Cluster) URLs() []string {
	var out []string
	for _, n := range c.Relays {
		out = append(out, n.URL())
	}
	return out
}

// AwaitMembers waits until every running relay lists every other running
// relay as a live peer (their hellos went round).
func (c *Cluster) AwaitMembers() {
	c.T.Helper()
	Eventually(c.T, 20*time.Second, func() error {
		for _, n := range c.Relays {
			if n.Relay == nil {
				continue
			}
			peers := n.Relay.Peers()
			for _, o := range c.Relays {
				if o != n && o.Relay != nil && peers[o.ID] == "" {
					return fmt.Errorf("relay %s does not list %s as a peer (%v)", n.ID, o.ID, peers)
				}
			}
		}
		return nil
	})
}

func randomHex() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
