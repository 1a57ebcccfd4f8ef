package agent_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// awaitServed waits until device d's web service answers through every
// relay in relays, and returns how long that took.
func awaitServed(t *testing.T, c *relaytest.Cluster, d *clusterDevice, within time.Duration, relays ...*relaytest.Node) time.Duration {
	t.Helper()
	start := time.Now()
	host := d.leases["web"].Hostname
	for _, n := range relays {
		client := publicClient(c, n)
		relaytest.Eventually(t, within, func() error {
			if code, body := get(client, "http://"+host+"/"); code != 200 || !strings.Contains(body, "hello from device") {
				return fmt.Errorf("%s via %s: %d %s", d.name, n.ID, code, body)
			}
			return nil
		})
	}
	return time.Since(start)
}

// awaitPage waits until host answers status with a page saying says
// through relay n.
func awaitPage(t *testing.T, c *relaytest.Cluster, n *relaytest.Node, host string, status int, says string) {
	t.Helper()
	client := publicClient(c, n)
	relaytest.Eventually(t, 15*time.Second, func() error {
		if code, body := get(client, "http://"+host+"/"); code != status || !strings.Contains(body, says) {
			return fmt.Errorf("%s via %s: %d %s, want %d saying %q", host, n.ID, code, body, status, says)
		}
		return nil
	})
}

// awaitControlPlane waits until every running relay's hellos reach the
// control plane (and its sessions are synced), or all fail.
func awaitControlPlane(t *testing.T, c *relaytest.Cluster, reachable bool) {
	t.Helper()
	relaytest.Eventually(t, 20*time.Second, func() error {
		for _, n := range c.Relays {
			if n.Relay != nil && n.Relay.ControlPlaneReachable() != reachable {
				return fmt.Errorf("relay %s: control plane reachable %v, want %v", n.ID, !reachable, reachable)
			}
		}
		return nil
	})
}

// rotated returns the cluster's relay URLs starting with relay i: the
// agent's first choice, then its failovers.
func rotated(c *relaytest.Cluster, i int) []string {
	urls := c.URLs()
	return append(urls[i:], urls[:i]...)
}

// TestClusterRelayKilled: a relay crashes (its listeners and connections
// close at once); its agent moves to its next relay, and every device is
// served again through every relay left; the restarted relay serves them
// all too.
func TestClusterRelayKilled(t *testing.T) {
	c := relaytest.StartCluster(t, 3, relaytest.Options{})
	c.AwaitMembers()
	web := webService(t)
	var devices []*clusterDevice
	for i := range c.Relays {
		devices = append(devices, startClusterDevice(t, c, fmt.Sprintf("pi%d", i+1), rotated(c, i), httpSvc("web", web)))
	}
	for _, d := range devices {
		awaitServed(t, c, d, 10*time.Second, c.Relays...)
	}

	killed := c.Relays[1]
	start := time.Now()
	killed.Kill()
	left := []*relaytest.Node{c.Relays[0], c.Relays[2]}
	awaitServed(t, c, devices[1], 30*time.Second, left...)
	t.Logf("failover: the device of the killed relay is served through every other relay %v after the kill", time.Since(start).Round(time.Millisecond))
	for _, d := range devices {
		awaitServed(t, c, d, 10*time.Second, left...)
	}
	dev, err := c.CP.Store.Device(context.Background(), "pi2")
	if err != nil || !dev.Online || dev.Relay != "relay-3" {
		t.Fatalf("pi2 after the kill: online %v on %q (%v), want relay-3", dev.Online, dev.Relay, err)
	}

	killed.Start()
	c.AwaitMembers()
	for _, d := range devices {
		awaitServed(t, c, d, 15*time.Second, c.Relays...)
	}
}

// TestClusterControlPlaneDown: with the control plane down, connected
// devices are served through every relay, a known device that reconnects
// is admitted from the relay's replica under its names, and enrollment is
// refused with 503; once the control plane is back, presence is right at
// once (the device that left is offline).
func TestClusterControlPlaneDown(t *testing.T) {
	c := relaytest.StartCluster(t, 3, relaytest.Options{})
	c.AwaitMembers()
	web := webService(t)
	state := t.TempDir()
	cfg := agentConfig(c.Env, state, "pi1", c.Token(1), httpSvc("web", web))
	cfg.RelayURLs = []string{c.Relays[0].URL()}
	pi1 := &clusterDevice{name: "pi1", agent: startAgent(t, cfg), leases: map[string]frames.Lease{}}
	for _, l := range pi1.agent.registered(t) {
		pi1.leases[l.Service] = l
	}
	pi2 := startClusterDevice(t, c, "pi2", []string{c.Relays[1].URL()}, httpSvc("web", web))
	pi3 := startClusterDevice(t, c, "pi3", []string{c.Relays[2].URL()}, httpSvc("web", web))
	for _, d := range []*clusterDevice{pi1, pi2, pi3} {
		awaitServed(t, c, d, 10*time.Second, c.Relays...)
	}
	token := c.Token(1)
	awaitControlPlane(t, c, true)

	c.StopControlPlane()
	awaitControlPlane(t, c, false)
	for _, d := range []*clusterDevice{pi1, pi2} {
		awaitServed(t, c, d, 5*time.Second, c.Relays...)
	}

	// pi1 restarts: admitted by relay-1 from its replica, under its names.
	pi1.agent.stop(t)
	cfg.EnrollToken = ""
	pi1.agent = startAgent(t, cfg)
	if leases := pi1.agent.registered(t); len(leases) != 1 || leases[0] != pi1.leases["web"] {
		t.Fatalf("pi1's leases while the control plane is down: %+v, want %+v", leases, pi1.leases["web"])
	}
	if n := c.Relays[0].Counter("tether_relay_admissions_total", "replica"); n != 1 {
		t.Fatalf("%v admissions from relay-1's replica", n)
	}
	awaitServed(t, c, pi1, 10*time.Second, c.Relays...)

	// pi3 leaves meanwhile.
	pi3.agent.stop(t)

	resp, err := publicClient(c, c.Relays[1]).Post("https://localhost"+frames.EnrollPath, "application/json",
		strings.NewReader(fmt.Sprintf(`{"token":%q,"public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","name":"pi9"}`, token)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 || !strings.Contains(string(body), "control plane") {
		t.Fatalf("enrollment with the control plane down: %d %s", resp.StatusCode, body)
	}

	c.StartControlPlane()
	c.WaitInterest(controlplane.SubjectConnect)
	awaitControlPlane(t, c, true)
	for name, relay := range map[string]string{"pi1": "relay-1", "pi2": "relay-2", "pi3": ""} {
		d, err := c.CP.Store.Device(context.Background(), name)
		if err != nil || d.Online != (relay != "") || relay != "" && d.Relay != relay {
			t.Errorf("%s right after the control plane returned: online %v on %q (%v), want %q", name, d.Online, d.Relay, err, relay)
		}
	}
	for _, n := range c.Relays {
		awaitPage(t, c, n, pi3.leases["web"].Hostname, 503, "pi3 is offline")
	}
	awaitServed(t, c, pi1, 10*time.Second, c.Relays...)
}

// TestClusterNATSOutage: a NATS server going down moves its clients to
// the others and nothing stops; with all of NATS down, relays say they are
// not ready yet keep serving what they hold, and a revocation is reported
// honestly as not delivered, then lands once NATS is back.
func TestClusterNATSOutage(t *testing.T) {
	c := relaytest.StartCluster(t, 3, relaytest.Options{})
	c.AwaitMembers()
	web := webService(t)
	pi1 := startClusterDevice(t, c, "pi1", []string{c.Relays[0].URL()}, httpSvc("web", web))
	pi2 := startClusterDevice(t, c, "pi2", []string{c.Relays[1].URL()}, httpSvc("web", web))

	t.Run("one NATS server down", func(t *testing.T) {
		c.StopNATSNode(0) // the control plane's and relay-1's
		awaitControlPlane(t, c, true)
		pi4 := startClusterDevice(t, c, "pi4", []string{c.Relays[0].URL()}, httpSvc("web", web))
		awaitServed(t, c, pi4, 10*time.Second, c.Relays...)
		c.StartNATSNode(0)
		awaitServed(t, c, pi1, 10*time.Second, c.Relays...)
	})

	t.Run("all of NATS down, revocation pending", func(t *testing.T) {
		for i := range 3 {
			c.StopNATSNode(i)
		}
		for _, n := range c.Relays {
			relaytest.Eventually(t, 10*time.Second, func() error {
				w := httptest.NewRecorder()
				n.Relay.ReadyHandler(n.NATSConnected).ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
				if w.Code != 503 || !strings.Contains(w.Body.String(), "NATS unreachable") {
					return fmt.Errorf("relay %s /readyz: %d %s", n.ID, w.Code, w.Body)
				}
				return nil
			})
		}
		// Relays forward to each other without NATS.
		awaitServed(t, c, pi1, 5*time.Second, c.Relays...)
		awaitServed(t, c, pi2, 5*time.Second, c.Relays...)

		// As tetherctl revoke asks the admin API.
		admin := httptest.NewServer(c.CP.Admin)
		defer admin.Close()
		res, err := (&httpapi.Client{BaseURL: admin.URL, Token: c.CP.AdminToken}).Revoke(context.Background(), "pi2")
		if err != nil {
			t.Fatal(err)
		}
		if res.Undelivered == "" || len(res.Confirmed) != 0 || !slices.Contains(res.Pending, "relay-2") {
			t.Fatalf("revocation with NATS down: %+v: want it undelivered and pending on relay-2", res)
		}
		t.Logf("revocation reported: confirmed %v, pending %v: %s", res.Confirmed, res.Pending, res.Undelivered)
		awaitServed(t, c, pi2, 5*time.Second, c.Relays[1]) // not cut off yet: the report was honest

		c.RestartNATS()
		if err := pi2.agent.exited(t, 30*time.Second); !errors.Is(err, agent.ErrRevoked) {
			t.Fatalf("pi2's agent after NATS returned: %v, want ErrRevoked", err)
		}
		for _, n := range c.Relays {
			awaitPage(t, c, n, pi2.leases["web"].Hostname, 503, "revoked")
		}
		awaitServed(t, c, pi1, 15*time.Second, c.Relays...)
	})
}
