package relay_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"io"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/replica"
)

// TestReplicaFollowsControlPlane: every relay learns a device's key,
// leases and presence from the control plane's events, whichever relay
// holds it, and keeps them in its bbolt file across a restart.
func TestReplicaFollowsControlPlane(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"}, frames.Service{Name: "ssh", Proto: "tcp"})
	relaytest.Eventually(t, 10*time.Second, func() error {
		rec, lease, ok := b.Replica.ByHostname("web-pi01")
		if !ok || rec.Name != "pi01" || !lease.Online || lease.Relay != "relay-test" || lease.Service != "web" {
			return fmt.Errorf("relay-b's replica: %+v %+v %v", rec, lease, ok)
		}
		if _, l, ok := b.Replica.ByPort(e.TCPPorts.First); !ok || l.Service != "ssh" {
			return fmt.Errorf("port %d: %+v %v", e.TCPPorts.First, l, ok)
		}
		return nil
	})

	// Relay B restarts: its file still knows the device; the device
	// leaving meanwhile is caught up by the snapshot at start.
	b.Kill()
	ra.Mux.Close()
	relaytest.Eventually(t, 10*time.Second, func() error {
		if d, err := e.CP.Store.Device(context.Background(), "pi01"); err != nil || d.Online {
			return fmt.Errorf("control plane: %+v %v", d, err)
		}
		return nil
	})
	b.Start()
	rec, lease, ok := b.Replica.ByHostname("web-pi01")
	if !ok || rec.Name != "pi01" || lease.Online {
		t.Fatalf("after restart: %+v %+v %v, want pi01 offline", rec, lease, ok)
	}
	if n := b.Counter("tether_relay_replica_snapshots_total", ""); n < 1 {
		t.Fatalf("%v snapshots", n)
	}
}

// TestPublicNameLeasedIsAStartupError: a relay whose public name is a
// device's leased hostname refuses to start, naming both.
func TestPublicNameLeasedIsAStartupError(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	nc, err := e.NATS.ConnectAs(natsperm.Relay, "relay relay-c")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	rep, err := replica.Open(replica.Config{Path: filepath.Join(t.TempDir(), "relay.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	rl, err := relay.New(relay.Config{RelayID: "relay-c", ControlPlane: &natsapi.Client{NC: nc}, Replica: rep, PublicNames: []string{"Web-Pi01.localhost."}})
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	err = rl.Start(t.Context())
	if err == nil || !strings.Contains(err.Error(), "web-pi01.localhost") || !strings.Contains(err.Error(), "pi01") {
		t.Fatalf("start: %v", err)
	}
}

// TestRelayNamesAreNeverLeased: once a relay announced its public names,
// no device takes them, whatever its device and service names (device
// "1" with service "relay" would be relay-1), and the relay restarts
// without a clash.
func TestRelayNamesAreNeverLeased(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.PublicNames = []string{"relay-1.localhost", "tether.example.net"}
	}})
	relaytest.Eventually(t, 10*time.Second, func() error {
		for _, r := range e.CP.Service.Relays() {
			if r.ID == "relay-test" && len(r.PublicNames) == 2 {
				return nil
			}
		}
		return fmt.Errorf("relay-test's names not announced yet")
	})
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "1")
	ls := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool()).Handshake(t, key, frames.Service{Name: "relay", Proto: "http"})
	if got := ls.Leases[0].Hostname; got != "relay-1--2.localhost" {
		t.Fatalf("device 1's service relay leased %q, want relay-1--2.localhost (relay-1 is the relay's own)", got)
	}
	e.KillRelay()
	e.StartRelay() // fails the test on a clash
}

// TestSyncAfterControlPlaneOutage: while the control plane is away, the
// relay says it is unreachable and keeps serving; a device that leaves
// meanwhile is reported offline as soon as the control plane is back (the
// relay's sync), and a device still connected is online there.
func TestSyncAfterControlPlaneOutage(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	stays := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	stays.ServeHTTP(t, echoHandler)
	leaves := e.EnrolledRaw(t, nil, "pi02")
	awaitReachable(t, e.Relay, true)

	e.StopControlPlane()
	awaitReachable(t, e.Relay, false)
	leaves.Mux.Close()
	relaytest.Eventually(t, 10*time.Second, func() error {
		if n := e.Relay.Sessions(); n != 1 {
			return fmt.Errorf("%d sessions", n)
		}
		return nil
	})
	if code, body := e.Get(false, "web-pi01.localhost", "/"); code != 200 {
		t.Fatalf("device served while the control plane is away: %d %s", code, body)
	}

	e.StartControlPlane()
	awaitReachable(t, e.Relay, true)
	for name, online := range map[string]bool{"pi01": true, "pi02": false} {
		d, err := e.CP.Store.Device(context.Background(), name)
		if err != nil || d.Online != online || online && d.Relay != "relay-test" {
			t.Errorf("%s right after the control plane returned: online %v on %q (%v), want online %v", name, d.Online, d.Relay, err, online)
		}
	}
	if n := e.Counter("tether_relay_syncs_total", "ok"); n != 1 {
		t.Errorf("%v syncs", n)
	}
}

// TestRevocationNoticeConfirmed: the control plane's revocation notice
// cuts the device's session here before the relay confirms it, and the
// device is refused from then on.
func TestRevocationNoticeConfirmed(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	ra := e.EnrolledRaw(t, nil, "pi01")
	awaitReachable(t, e.Relay, true)
	res, err := e.CP.Service.Revoke(t.Context(), "pi01")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Confirmed) != 1 || res.Confirmed[0] != "relay-test" || len(res.Pending) != 0 {
		t.Fatalf("revoke: %+v", res)
	}
	if got := ra.ClosedWith(t, time.Second); got == nil || got.Code != frames.CodeRevoked {
		t.Fatalf("session ended with %v, want revoked", got)
	}
	again := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	again.Send(t, &frames.Hello{PublicKey: ra.Pub, AgentVersion: "raw", HeartbeatMillis: 1000})
	ch := again.Recv(t).(*frames.Challenge)
	again.Key = ra.Key
	again.Pub = ra.Pub
	again.Send(t, again.Sign(ch.Nonce, ch.RelayID))
	if got := again.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeRevoked {
		t.Fatalf("revoked device reconnecting: %v", got)
	}
}

// awaitReachable waits until the relay's hellos reach the control plane
// (and its sessions are synced), or fail.
func awaitReachable(t *testing.T, rl *relay.Server, up bool) {
	t.Helper()
	relaytest.Eventually(t, 15*time.Second, func() error {
		if rl.ControlPlaneReachable() != up {
			return fmt.Errorf("control plane reachable: %v, want %v", !up, up)
		}
		return nil
	})
}

// TestOfflineAdmission: while the control plane is away, a known device
// that reconnects is admitted from the replica under its known names (a
// new service waits), enrollment is refused with 503 saying why, and once
// the control plane is back the session is synced and the new service
// leased.
func TestOfflineAdmission(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web, ssh, extra := frames.Service{Name: "web", Proto: "http"}, frames.Service{Name: "ssh", Proto: "tcp"}, frames.Service{Name: "api", Proto: "http"}
	first := e.EnrolledRaw(t, nil, "pi01", web, ssh)
	token := e.Token(1)
	before, err := e.CP.Store.Device(context.Background(), "pi01")
	if err != nil {
		t.Fatal(err)
	}
	awaitReachable(t, e.Relay, true)

	e.StopControlPlane()
	awaitReachable(t, e.Relay, false)
	first.Mux.Close()
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	leases := ra.Handshake(t, first.Key, web, ssh, extra)
	if len(leases.Leases) != 2 || leases.Leases[0].Hostname != "web-pi01.localhost" || leases.Leases[1].Port != e.TCPPorts.First {
		t.Fatalf("leases while the control plane is away: %+v", leases.Leases)
	}
	ra.ServeHTTP(t, echoHandler)
	e.AwaitPage(false, "web-pi01.localhost", "/", 200, "hello from device", 10*time.Second)
	if n := e.Counter("tether_relay_admissions_total", "replica"); n != 1 {
		t.Fatalf("%v admissions from the replica", n)
	}

	resp, err := e.Client().Post("https://localhost"+frames.EnrollPath, "application/json",
		strings.NewReader(fmt.Sprintf(`{"token":%q,"public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","name":"pi09"}`, token)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 || !strings.Contains(string(body), "cannot reach") {
		t.Fatalf("enrollment while the control plane is away: %d %s", resp.StatusCode, body)
	}

	e.StartControlPlane()
	awaitReachable(t, e.Relay, true)
	d, err := e.CP.Store.Device(context.Background(), "pi01")
	if err != nil || !d.Online || d.Relay != "relay-test" || d.Generation <= before.Generation {
		t.Fatalf("after the sync: %+v %v (generation before %d)", d, err, before.Generation)
	}
	again, ok := ra.Recv(t).(*frames.Leases)
	if !ok || len(again.Leases) != 3 {
		t.Fatalf("leases after the control plane returned: %+v", again)
	}
	e.AwaitPage(false, "api-pi01.localhost", "/", 200, "hello from device", 10*time.Second)
}

// TestForwardAcrossRelays: a public request that reaches relay B for a
// device whose agent relay A holds is forwarded to A and served, with the
// public client's address in X-Forwarded-For; once the device leaves, B
// says it is offline.
func TestForwardAcrossRelays(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.ServeHTTP(t, echoHandler)
	for _, tls := range []bool{false, true} {
		b.AwaitPage(tls, "web-pi01.localhost", "/x", 200, "hello from device; host=web-pi01.localhost xff=127.0.0.1", 10*time.Second)
	}
	if n := b.Counter("tether_relay_forwarded_streams_total", "relay-test"); n < 1 {
		t.Errorf("%v streams forwarded to relay-test", n)
	}
	if peers := b.Relay.Peers(); peers["relay-test"] == "" {
		t.Errorf("relay-b's peers: %v", peers)
	}
	ra.Mux.Close()
	b.AwaitPage(false, "web-pi01.localhost", "/", 503, "pi01 is offline", 10*time.Second)
}

// TestReadiness: /readyz says ready, degraded while the control plane is
// unreachable (200: the relay still serves), and not ready without NATS.
func TestReadiness(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	var natsDown atomic.Bool
	h := e.Relay.ReadyHandler(func() bool { return !natsDown.Load() })
	readyz := func() (int, string) {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
		return w.Code, w.Body.String()
	}
	awaitReachable(t, e.Relay, true)
	if code, body := readyz(); code != 200 || body != "ready\n" {
		t.Fatalf("%d %q", code, body)
	}
	e.StopControlPlane()
	awaitReachable(t, e.Relay, false)
	if code, body := readyz(); code != 200 || body != "degraded: control plane unreachable\n" {
		t.Fatalf("control plane away: %d %q", code, body)
	}
	natsDown.Store(true)
	if code, body := readyz(); code != 503 || body != "not ready: NATS unreachable\n" {
		t.Fatalf("NATS away: %d %q", code, body)
	}
}

// TestClusterHarness: three relays on a three-server NATS cluster find
// each other and serve a device held by any of them through every one,
// also after a NATS server was bounced.
func TestClusterHarness(t *testing.T) {
	c := relaytest.StartCluster(t, 3, relaytest.Options{})
	c.AwaitMembers()
	ra := c.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.ServeHTTP(t, echoHandler)
	for _, n := range c.Relays {
		n.AwaitPage(true, "web-pi01.localhost", "/", 200, "hello from device", 10*time.Second)
	}
	c.BounceNATSNode(1) // relay-2's
	c.AwaitMembers()
	for _, n := range c.Relays {
		n.AwaitPage(false, "web-pi01.localhost", "/", 200, "hello from device", 10*time.Second)
	}
}
