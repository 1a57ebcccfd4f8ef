package relay_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestRegisterFlood: an enrolled device that registers new service names
// over and over (a malicious agent, written with frames) gets at most
// its quota of leases, then its session ends; the fleet's port pool and
// the store stay as they were beyond that, and another device still gets
// its port.
func TestRegisterFlood(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{TCPPorts: 64})
	db := filepath.Join(e.DataDir, "controlplane.db")
	size := func() int64 {
		fi, err := os.Stat(db)
		if err != nil {
			t.Fatalf("control plane store: %v", err)
		}
		return fi.Size()
	}
	before := size()

	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "flood")
	granted, sessions, registers := map[uint16]bool{}, 0, 0
	var last *frames.Error
	for sessions < 5 { // a flooder reconnects when cut off
		ra := e.EnrolledRaw(t, key, "flood")
		sessions++
		for i := 0; ; i++ {
			svcs := make([]frames.Service, 5)
			for j := range svcs {
				svcs[j] = frames.Service{Name: fmt.Sprintf("s%dx%d", i, j), Proto: "tcp"}
			}
			ra.Send(t, &frames.Register{Services: svcs})
			registers++
			ra.Ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
			m, err := frames.Read(ra.Ctrl, 0)
			if err != nil {
				break
			}
			if e, ok := m.(*frames.Error); ok {
				last = e
				break
			}
			for _, l := range m.(*frames.Leases).Leases {
				granted[l.Port] = true
			}
		}
	}
	leases, err := e.CP.Store.Leases(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	perDevice := map[string]int{}
	for _, l := range leases {
		perDevice[l.DeviceName]++
	}
	for dev, n := range perDevice {
		if n > 32 {
			t.Errorf("device %s holds %d leases, quota 32", dev, n)
		}
	}
	if last == nil {
		t.Fatal("the flood was never refused")
	}
	// Another device still gets a port.
	honest := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	_, hkey, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, hkey, "honest")
	ls := honest.Handshake(t, hkey, frames.Service{Name: "ssh", Proto: "tcp"})
	if len(ls.Leases) != 1 || ls.Leases[0].Port == 0 {
		t.Fatalf("honest device: %+v", ls)
	}
	after := size()
	t.Logf("register flood: %d registrations of 5 new services over %d sessions: %d ports granted in all (%d leases per device at most), then: %q; "+
		"store %d → %d KiB; an honest device then got port %d",
		registers, sessions, len(granted), maxOf(perDevice), last.Message, before>>10, after>>10, ls.Leases[0].Port)
	if after-before > 1<<20 {
		t.Errorf("store grew by %d KiB", (after-before)>>10)
	}
}

func maxOf(m map[string]int) int {
	n := 0
	for _, v := range m {
		n = max(n, v)
	}
	return n
}

// TestRegisterBurst: re-registering the same services is idempotent, but
// an agent that does it in a loop is cut off after 30 within 10s (each
// one is a write on the control plane).
func TestRegisterBurst(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	for i := 1; ; i++ {
		ra.Send(t, &frames.Register{Services: []frames.Service{{Name: "web", Proto: "http"}}})
		m := ra.Recv(t)
		if e, ok := m.(*frames.Error); ok {
			if i != 31 || e.Code != frames.CodeBadRequest {
				t.Fatalf("registration %d: %v", i, e)
			}
			return
		}
		if ls, ok := m.(*frames.Leases); !ok || ls.Leases[0].Hostname != "web-pi01.localhost" {
			t.Fatalf("registration %d: %#v", i, m)
		}
	}
}

// TestLeaseRelease: a lease its device no longer uses is released through
// the control plane: no relay serves the name any more, and during the
// quarantine nobody gets it, its device neither.
func TestLeaseRelease(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.ServeHTTP(t, echoHandler)
	e.AwaitPage(false, "web-pi01.localhost", "/", 200, "", 10*time.Second)
	ctx := context.Background()
	if _, err := e.CP.Service.ReleaseLease(ctx, "web-pi01"); err == nil {
		t.Fatal("a lease in use was released")
	}
	// The device stops serving web: the lease stays its own until released.
	ra.Send(t, &frames.Register{})
	if ls, ok := ra.Recv(t).(*frames.Leases); !ok || len(ls.Leases) != 0 {
		t.Fatalf("register nothing: %+v", ls)
	}
	l, err := e.CP.Service.ReleaseLease(ctx, "web-pi01")
	if err != nil || l.Service != "web" {
		t.Fatalf("release: %+v %v", l, err)
	}
	e.AwaitPage(false, "web-pi01.localhost", "/", 404, "No Tether service", 10*time.Second)
	b.AwaitPage(false, "web-pi01.localhost", "/", 404, "No Tether service", 10*time.Second)
	ra.Send(t, &frames.Register{Services: []frames.Service{{Name: "web", Proto: "http"}}})
	if ls, ok := ra.Recv(t).(*frames.Leases); !ok || len(ls.Leases) != 1 || ls.Leases[0].Hostname != "web-pi01--2.localhost" {
		t.Fatalf("web again during the quarantine: %+v", ls)
	}
}

// TestDeviceReplaced: a revoked device's replacement (a new key, enrolled
// with the token tetherctl device replace prints) is served under the old
// device's hostname by every relay; the old key stays refused.
func TestDeviceReplaced(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	_, oldKey, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, oldKey, "pi01")
	old := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	old.Handshake(t, oldKey, frames.Service{Name: "web", Proto: "http"})
	ctx := context.Background()
	_, token, _, err := e.CP.Service.ReplaceDevice(ctx, "pi01", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := old.ClosedWith(t, 10*time.Second); got == nil || got.Code != frames.CodeRevoked {
		t.Fatalf("the replaced device's session: %v", got)
	}
	nc, err := e.NATS.ConnectAs(natsperm.Relay, "test enroller")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_, newKey, _ := ed25519.GenerateKey(nil)
	resp, err := (&natsapi.Client{NC: nc}).Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(token),
		EnrollDevice: frames.EnrollDevice{PublicKey: newKey.Public().(ed25519.PublicKey), Name: "pi99"}})
	if err != nil || resp.Name != "pi01" {
		t.Fatalf("enroll the replacement: %+v %v", resp, err)
	}
	repl := relaytest.DialRaw(t, b.URL(), e.CA.Pool())
	ls := repl.Handshake(t, newKey, frames.Service{Name: "web", Proto: "http"})
	if ls.Leases[0].Hostname != "web-pi01.localhost" {
		t.Fatalf("the replacement's lease: %+v", ls)
	}
	repl.ServeHTTP(t, echoHandler)
	e.AwaitPage(false, "web-pi01.localhost", "/", 200, "", 10*time.Second)
	b.AwaitPage(false, "web-pi01.localhost", "/", 200, "", 10*time.Second)
	again := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	again.Send(t, &frames.Hello{PublicKey: [32]byte(oldKey.Public().(ed25519.PublicKey)), HeartbeatMillis: 1000})
	ch := again.Recv(t).(*frames.Challenge)
	again.Key = oldKey
	copy(again.Pub[:], oldKey.Public().(ed25519.PublicKey))
	again.Send(t, again.Sign(ch.Nonce, ch.RelayID))
	if got := again.ClosedWith(t, 10*time.Second); got == nil || got.Code == 0 {
		t.Fatalf("the old key after the replacement: %v", got)
	}
	for _, n := range []*relaytest.Node{b} {
		if _, ok := n.Replica.Device(frames.DeviceID(oldKey.Public().(ed25519.PublicKey))); ok {
			t.Errorf("relay %s still knows the replaced device", n.ID)
		}
	}
}
