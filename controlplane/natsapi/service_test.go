package natsapi_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"slices"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/clusterca"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
)

func wantKind(t *testing.T, err error, k controlplane.Kind) {
	t.Helper()
	if err == nil || controlplane.KindOf(err) != k {
		t.Fatalf("got error %v, want kind %s", err, k)
	}
}

// TestConnectNeedsTheDevicesSignature: the control plane verifies the
// agent's signature again and accepts each nonce once.
func TestConnectNeedsTheDevicesSignature(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	ctx := t.Context()
	c := e.Relay(0, "relay-a")
	d := e.Enroll(c, "pi01")

	good := d.Handshake("relay-a")
	if _, err := c.Connect(ctx, good); err != nil {
		t.Fatalf("signed connect: %v", err)
	}
	_, err := c.Connect(ctx, good)
	wantKind(t, err, controlplane.KindUnauthorized) // the same nonce and signature again

	forged := d.Handshake("relay-a")
	forged.Signature[0] ^= 1
	_, err = c.Connect(ctx, forged)
	wantKind(t, err, controlplane.KindUnauthorized)

	// A signature for another relay does not open a session here.
	other := d.Handshake("relay-b")
	other.RelayID = "relay-a"
	_, err = c.Connect(ctx, other)
	wantKind(t, err, controlplane.KindUnauthorized)

	short := d.Handshake("relay-a")
	short.PublicKey = short.PublicKey[:31]
	_, err = c.Connect(ctx, short)
	wantKind(t, err, controlplane.KindInvalid)

	if dev, _ := e.CP.Store.Device(ctx, "pi01"); dev.Generation != 1 {
		t.Fatalf("generation %d after one good connect", dev.Generation)
	}
}

// TestEventsNumberedInOrder: every change publishes its event, stamped
// with the epoch and consecutive seqs.
func TestEventsNumberedInOrder(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	ctx := t.Context()
	c := e.Relay(0, "relay-a")
	ev := controlplanetest.Watch(t, c)
	d := e.Enroll(c, "pi01")
	cr, err := c.Connect(ctx, d.Handshake("relay-a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Register(ctx, controlplane.RegisterRequest{DeviceID: d.ID, Generation: cr.Generation,
		Services: []controlplane.Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp"}}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: d.ID, Generation: cr.Generation}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CP.Service.Revoke(ctx, "pi01"); err != nil {
		t.Fatal(err)
	}
	if err := c.ResetRelay(ctx, "relay-a"); err != nil {
		t.Fatal(err)
	}
	kinds := []string{controlplane.EventEnrolled, controlplane.EventSession, controlplane.EventLeases, controlplane.EventOffline, controlplane.EventRevoked, controlplane.EventRelayDown}
	for i, kind := range kinds {
		got := ev.Next(t)
		if got.Kind != kind || got.Seq != uint64(i+1) || got.Epoch != e.CP.Service.Epoch() {
			t.Fatalf("event %d: %s seq %d epoch %s, want %s seq %d epoch %s", i, got.Kind, got.Seq, got.Epoch, kind, i+1, e.CP.Service.Epoch())
		}
		switch got.Kind {
		case controlplane.EventEnrolled:
			if got.Device == nil || got.Device.ID != d.ID || len(got.Device.PublicKey) != 32 {
				t.Fatalf("enrolled event without the record: %+v", got)
			}
		case controlplane.EventSession:
			if got.DeviceID != d.ID || got.Generation != cr.Generation || got.RelayID != "relay-a" {
				t.Fatalf("session event %+v", got)
			}
		case controlplane.EventLeases:
			if len(got.Leases) != 2 {
				t.Fatalf("leases event %+v", got)
			}
		case controlplane.EventRelayDown:
			if got.RelayID != "relay-a" {
				t.Fatalf("relay-down event %+v", got)
			}
		}
	}
	// Hello tells a relay the seq it should have reached.
	h, err := c.Hello(ctx, controlplane.HelloRequest{RelayID: "relay-a"})
	if err != nil || h.Seq != uint64(len(kinds)) || h.Epoch != e.CP.Service.Epoch() {
		t.Fatalf("hello: seq %d epoch %s (%v)", h.Seq, h.Epoch, err)
	}
}

// TestSnapshotPlusEventsIsTheState builds a relay's replica the way
// Client.Snapshot documents, while devices keep connecting and
// disconnecting, and checks it ends equal to the store.
func TestSnapshotPlusEventsIsTheState(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	ctx := t.Context()
	c := e.Relay(0, "relay-a")
	var devices []controlplanetest.Device
	for i := range 30 {
		devices = append(devices, e.Enroll(c, "pi"+string(rune('a'+i%26))+string(rune('a'+i/26))))
	}
	ev := controlplanetest.Watch(t, c)

	// Writers: sessions come and go on two relays.
	stop := make(chan struct{})
	writers := make(chan error, len(devices))
	for i, d := range devices {
		go func() {
			relay := []string{"relay-a", "relay-b"}[i%2]
			for n := 0; ; n++ {
				select {
				case <-stop:
					writers <- nil
					return
				default:
				}
				cr, err := c.Connect(ctx, d.Handshake(relay))
				if err != nil {
					writers <- err
					return
				}
				if n%2 == 0 {
					c.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: d.ID, Generation: cr.Generation})
				}
			}
		}()
	}

	type state struct {
		online bool
		relay  string
		gen    uint64
	}
	replica := map[string]state{}
	pageSeq := map[string]uint64{} // device → seq of the page that covered it
	var pages []controlplane.SnapshotResponse
	err := c.SnapshotAll(ctx, 7, func(p controlplane.SnapshotResponse) error {
		pages = append(pages, p)
		for _, r := range p.Devices {
			replica[r.ID] = state{r.Online, r.Relay, r.Generation}
			pageSeq[r.ID] = p.Seq
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(pages) < 4 || len(replica) != len(devices) {
		t.Fatalf("%d pages, %d devices", len(pages), len(replica))
	}
	close(stop)
	for range devices {
		if err := <-writers; err != nil {
			t.Fatal(err)
		}
	}
	h, err := c.Hello(ctx, controlplane.HelloRequest{RelayID: "relay-a"})
	if err != nil {
		t.Fatal(err)
	}
	// Apply the events: each to its device only after its page's seq.
	var last uint64
	for last < h.Seq {
		got := ev.Next(t)
		if got.Seq != last+1 && last != 0 {
			t.Fatalf("gap: seq %d after %d", got.Seq, last)
		}
		last = got.Seq
		if got.Seq <= pageSeq[got.DeviceID] {
			continue
		}
		s := replica[got.DeviceID]
		switch got.Kind {
		case controlplane.EventSession:
			s = state{true, got.RelayID, got.Generation}
		case controlplane.EventOffline:
			if got.Generation == s.gen {
				s.online = false
			}
		}
		replica[got.DeviceID] = s
	}
	for _, d := range devices {
		dev, err := e.CP.Store.Device(ctx, d.ID)
		if err != nil {
			t.Fatal(err)
		}
		if want := (state{dev.Online, dev.Relay, dev.Generation}); replica[d.ID] != want {
			t.Fatalf("device %s: replica %+v, store %+v", d.Name, replica[d.ID], want)
		}
	}
}

// TestMembership: hellos make relays live; a silent one is declared down
// (its sessions end, relay-down is published) and stays pending for
// revocations until it says hello again.
func TestMembership(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{Daemon: func(c *daemon.Config) {
		c.HelloInterval = 100 * time.Millisecond
		c.RevokeTimeout = 500 * time.Millisecond
	}})
	ctx := t.Context()
	a, b := e.Relay(0, "relay-a"), e.Relay(0, "relay-b")
	d := e.Enroll(a, "pi01")
	if _, err := b.Connect(ctx, d.Handshake("relay-b")); err != nil {
		t.Fatal(err)
	}
	ev := controlplanetest.Watch(t, a)
	hb, err := b.Hello(ctx, controlplane.HelloRequest{RelayID: "relay-b", ClusterAddr: "127.0.0.1:7444", Sessions: 1, UnboundPorts: []uint16{20001}})
	if err != nil || len(hb.Relays) != 1 || hb.Relays[0].ID != "relay-b" {
		t.Fatalf("hello of relay-b: %+v %v", hb, err)
	}
	_, err = a.Hello(ctx, controlplane.HelloRequest{RelayID: "bad.id"})
	wantKind(t, err, controlplane.KindInvalid)

	// relay-a keeps saying hello; relay-b falls silent.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			a.Hello(context.Background(), controlplane.HelloRequest{RelayID: "relay-a", ClusterAddr: "127.0.0.1:7445"})
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	down := ev.Until(t, controlplane.EventRelayDown)
	if got := down[len(down)-1]; got.RelayID != "relay-b" {
		t.Fatalf("relay-down for %q", got.RelayID)
	}
	if dev, _ := e.CP.Store.Device(ctx, "pi01"); dev.Online {
		t.Fatal("the silent relay's session is still online")
	}
	live := e.CP.Service.Relays()
	if len(live) != 1 || live[0].ID != "relay-a" || live[0].ClusterAddr != "127.0.0.1:7445" {
		t.Fatalf("live relays %+v", live)
	}
	// relay-a does not answer revocations either: both pending, b as lost.
	res, err := e.CP.Service.Revoke(ctx, "pi01")
	if err != nil || !slices.Equal(res.Pending, []string{"relay-a", "relay-b"}) || len(res.Confirmed) != 0 {
		t.Fatalf("revoke: %+v %v", res, err)
	}
	// relay-b returns.
	if _, err := b.Hello(ctx, controlplane.HelloRequest{RelayID: "relay-b"}); err != nil {
		t.Fatal(err)
	}
	if n := len(e.CP.Service.Relays()); n != 2 {
		t.Fatalf("%d live relays after relay-b's hello", n)
	}
}

// TestRevokeConfirmedByLiveRelays: the answer names who confirmed and who
// did not; with NATS down, the revocation is stored and says so.
func TestRevokeConfirmedByLiveRelays(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{Daemon: func(c *daemon.Config) { c.RevokeTimeout = 300 * time.Millisecond }})
	ctx := t.Context()
	relays := map[string]*natsapi.Client{}
	applied := make(chan string, 10)
	for _, id := range []string{"a", "b", "c"} {
		relays[id] = e.Relay(0, id)
		if _, err := relays[id].Hello(ctx, controlplane.HelloRequest{RelayID: id}); err != nil {
			t.Fatal(err)
		}
		if id == "c" {
			continue // c never answers
		}
		err := relays[id].ServeRevocations(ctx, id, func(_ context.Context, n controlplane.RevokeNotice) error {
			applied <- id + ":" + n.DeviceID
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	d := e.Enroll(relays["a"], "pi01")
	res, err := e.CP.Service.Revoke(ctx, "pi01")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Device.Revoked || !slices.Equal(res.Confirmed, []string{"a", "b"}) || !slices.Equal(res.Pending, []string{"c"}) || res.Undelivered != "" {
		t.Fatalf("revoke: %+v", res)
	}
	got := []string{<-applied, <-applied}
	slices.Sort(got)
	if !slices.Equal(got, []string{"a:" + d.ID, "b:" + d.ID}) {
		t.Fatalf("applied %v", got)
	}
	_, err = relays["a"].Connect(ctx, d.Handshake("a"))
	wantKind(t, err, controlplane.KindRevoked)

	// NATS down entirely: stored, and the answer says nobody was told.
	e.Enroll(relays["a"], "pi02")
	e.NATS.Shutdown()
	res, err = e.CP.Service.Revoke(ctx, "pi02")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Device.Revoked || res.Undelivered == "" || len(res.Confirmed) != 0 || !slices.Equal(res.Pending, []string{"a", "b", "c"}) {
		t.Fatalf("revoke with NATS down: %+v", res)
	}
}

func TestSyncThroughNATS(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	ctx := t.Context()
	a, b := e.Relay(0, "relay-a"), e.Relay(0, "relay-b")
	kept, superseded, gone := e.Enroll(a, "kept"), e.Enroll(a, "superseded"), e.Enroll(a, "gone")
	for _, d := range []controlplanetest.Device{kept, superseded, gone} {
		if _, err := a.Connect(ctx, d.Handshake("relay-a")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Connect(ctx, superseded.Handshake("relay-b")); err != nil {
		t.Fatal(err)
	}
	ev := controlplanetest.Watch(t, b)
	resp, err := a.Sync(ctx, controlplane.SyncRequest{RelayID: "relay-a", Sessions: []controlplane.SyncSession{
		{DeviceID: kept.ID, Generation: 2}, // admitted provisionally while the control plane was away
		{DeviceID: superseded.ID, Generation: 1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Sessions) != 1 || resp.Sessions[0] != (controlplane.SyncSession{DeviceID: kept.ID, Generation: 2}) {
		t.Fatalf("sync answer %+v", resp.Sessions)
	}
	off, on := ev.Next(t), ev.Next(t)
	if off.Kind != controlplane.EventOffline || off.DeviceID != gone.ID || on.Kind != controlplane.EventSession || on.DeviceID != kept.ID || on.Generation != 2 {
		t.Fatalf("sync events %+v %+v", off, on)
	}
	cr, err := b.Connect(ctx, kept.Handshake("relay-b"))
	if err != nil || cr.Generation != 3 {
		t.Fatalf("connect after sync: generation %d (%v), want 3", cr.Generation, err)
	}
	_, err = a.Sync(ctx, controlplane.SyncRequest{RelayID: "relay.a"})
	wantKind(t, err, controlplane.KindInvalid)
}

func TestCertThroughNATS(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	ctx := t.Context()
	c := e.Relay(0, "relay-a")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	resp, err := c.Cert(ctx, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertPeer, PublicKey: der})
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(resp.Root)
	if err != nil || !root.Equal(e.CP.CA.Cert) {
		t.Fatalf("root: %v", err)
	}
	if id, err := clusterca.VerifyPeer(root, [][]byte{resp.Cert}, x509.ExtKeyUsageClientAuth); err != nil || id != "relay-a" {
		t.Fatalf("peer certificate: %q %v", id, err)
	}
	if _, err := c.Cert(ctx, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatalf("intermediate for the domain: %v", err)
	}
	_, err = c.Cert(ctx, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"example.com"}})
	wantKind(t, err, controlplane.KindInvalid)
}

func TestUnavailable(t *testing.T) {
	e := controlplanetest.Start(t, controlplanetest.Options{})
	c := e.Relay(0, "relay-a")
	c.Timeout = 200 * time.Millisecond
	e.CP.Close()
	_, err := c.Snapshot(t.Context(), controlplane.SnapshotRequest{})
	wantKind(t, err, controlplane.KindUnavailable)
}
