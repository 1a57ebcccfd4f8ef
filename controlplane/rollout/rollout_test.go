package rollout_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/boltstore"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/controlplane/rollout"
	"github.com/tetherfleet/tether/frames"
)

type plane struct {
	store *boltstore.Store
	mgr   *rollout.Manager
	evs   []controlplane.ReleaseEvent
}

// open opens the control plane's state in dir as the daemon does.
func open(t *testing.T, dir string, key controlplanetest.ReleaseKey) *plane {
	t.Helper()
	st, err := boltstore.Open(boltstore.Config{Path: filepath.Join(dir, "controlplane.db")})
	if err != nil {
		t.Fatal(err)
	}
	p := &plane{store: st}
	if p.mgr, err = rollout.New(rollout.Config{Store: st, Dir: filepath.Join(dir, "releases"), Keys: key.Keys,
		OnChange: func(ev controlplane.ReleaseEvent) { p.evs = append(p.evs, ev) }}); err != nil {
		t.Fatal(err)
	}
	return p
}

func enroll(t *testing.T, st *boltstore.Store, n int, labels map[string]string, version string) []string {
	t.Helper()
	ctx := context.Background()
	tok, _, _ := st.CreateToken(ctx, n, time.Hour, labels)
	var ids []string
	for range n {
		pub, _, _ := ed25519.GenerateKey(nil)
		r, err := st.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok),
			EnrollDevice: frames.EnrollDevice{PublicKey: pub, Name: fmt.Sprintf("d%x", pub[:4]), AgentVersion: version}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.DeviceID)
	}
	return ids
}

// TestDurable: releases, binaries, the rollout and reports survive a
// restart of the control plane.
func TestDurable(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	dir := t.TempDir()
	ctx := context.Background()
	p := open(t, dir, key)
	bin := make([]byte, 5000)
	rand.Read(bin)
	manifest, sig := key.Sign(t, controlplanetest.Manifest("v1.4.0", map[string][]byte{"arm64": bin}))
	if _, err := p.mgr.Publish(ctx, manifest, sig); err != nil {
		t.Fatal(err)
	}
	if info, err := p.mgr.PutArtifact(ctx, "v1.4.0", "arm64", bytes.NewReader(bin)); err != nil || !info.Complete {
		t.Fatalf("put: %+v %v", info, err)
	}
	if len(p.evs) != 1 || p.evs[0].Kind != controlplane.ReleaseEventPublished {
		t.Fatalf("events: %+v", p.evs)
	}
	ids := enroll(t, p.store, 10, map[string]string{"site": "lab"}, "v1.3.0")
	if _, err := p.mgr.Start(ctx, "v1.4.0", map[string]string{"site": "lab"}, 30); err != nil {
		t.Fatal(err)
	}
	plan, err := p.mgr.Plan(ctx)
	if err != nil || len(plan.Devices) != 3 {
		t.Fatalf("plan: %d devices, %v", len(plan.Devices), err)
	}
	if err := p.mgr.Report(ctx, controlplane.UpdateReport{DeviceID: plan.Devices[0], Version: "v1.4.0", State: frames.UpdateHealthy}); err != nil {
		t.Fatal(err)
	}
	p.store.Close()

	p = open(t, dir, key)
	defer p.store.Close()
	rel, ok, err := p.mgr.Latest(ctx)
	if err != nil || !ok || !bytes.Equal(rel.Manifest, manifest) || !bytes.Equal(rel.Signature, sig) {
		t.Fatalf("latest after restart: %v %v", ok, err)
	}
	buf := make([]byte, len(bin)+10)
	if n, size, err := p.mgr.ReadArtifact(ctx, "v1.4.0", "arm64", 0, buf); err != nil || size != int64(len(bin)) || !bytes.Equal(buf[:n], bin) {
		t.Fatalf("binary after restart: %d %d %v", n, size, err)
	}
	again, err := p.mgr.Plan(ctx)
	if err != nil || again.Rollout == nil || again.Rollout.Percent != 30 || len(again.Devices) != 3 {
		t.Fatalf("plan after restart: %+v %v", again, err)
	}
	st, err := p.mgr.Status(ctx)
	if err != nil || st.States[frames.UpdateHealthy] != 1 || st.States[controlplane.UpdatePending] != 2 || st.States[controlplane.UpdateNotSelected] != 7 {
		t.Fatalf("status after restart: %+v %v", st.States, err)
	}
	if len(ids) != 10 {
		t.Fatal(len(ids))
	}
}

// TestStatusStates: every state a device can be in, and the plan leaves
// out what must not be offered.
func TestStatusStates(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	dir := t.TempDir()
	p := open(t, dir, key)
	defer p.store.Close()
	ctx := context.Background()
	bin := []byte("binary v1.4.0")
	manifest, sig := key.Sign(t, controlplanetest.Manifest("v1.4.0", map[string][]byte{"arm64": bin}))
	p.mgr.Publish(ctx, manifest, sig)
	p.mgr.PutArtifact(ctx, "v1.4.0", "arm64", bytes.NewReader(bin))
	old := enroll(t, p.store, 4, nil, "v1.3.0")
	current := enroll(t, p.store, 1, nil, "v1.4.0")
	dev := enroll(t, p.store, 1, nil, "dev")
	if _, err := p.mgr.Start(ctx, "v1.4.0", nil, 100); err != nil {
		t.Fatal(err)
	}
	p.mgr.Report(ctx, controlplane.UpdateReport{DeviceID: old[0], Version: "v1.4.0", State: frames.UpdateRolledBack, Reason: "no heartbeat"})
	p.mgr.Report(ctx, controlplane.UpdateReport{DeviceID: old[1], Version: "v1.4.0", State: frames.UpdateRefused, Reason: "below the floor"})
	p.mgr.Report(ctx, controlplane.UpdateReport{DeviceID: old[2], Version: "v1.4.0", State: frames.UpdateFailed, Reason: "hash differs"})
	st, err := p.mgr.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{frames.UpdateRolledBack: 1, frames.UpdateRefused: 1, frames.UpdateFailed: 1, controlplane.UpdatePending: 1,
		controlplane.UpdateUpToDate: 1, controlplane.UpdateDevBuild: 1}
	if fmt.Sprint(st.States) != fmt.Sprint(want) || st.Matching != 6 || st.Chosen != 5 {
		t.Fatalf("status: %v matching %d chosen %d", st.States, st.Matching, st.Chosen)
	}
	plan, _ := p.mgr.Plan(ctx)
	// Offered: the failed one (it may try again) and the pending one; not
	// the rolled back, the refused, the current or the dev build.
	if fmt.Sprint(plan.Devices) != fmt.Sprint(sorted(old[2], old[3])) {
		t.Fatalf("plan devices %v, want %v (current %v, dev %v)", plan.Devices, sorted(old[2], old[3]), current, dev)
	}
	if err := p.mgr.Report(ctx, controlplane.UpdateReport{DeviceID: old[3], Version: "v1.4.0", State: "bogus"}); controlplane.KindOf(err) != controlplane.KindInvalid {
		t.Fatalf("bogus state: %v", err)
	}
	// A refused upload leaves nothing, and never replaces the binary.
	if _, err := p.mgr.PutArtifact(ctx, "v1.4.0", "arm64", bytes.NewReader([]byte("binary v1.4.1"))); controlplane.KindOf(err) != controlplane.KindInvalid {
		t.Fatalf("other bytes: %v", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "releases", "v1.4.0", "tether-agent-linux-arm64")); !bytes.Equal(got, bin) {
		t.Fatal("the binary changed")
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "releases", "v1.4.0"))
	for _, e := range entries {
		if filepath.Ext(e.Name()) == ".tmp" {
			t.Fatalf("temporary file left: %s", e.Name())
		}
	}
}

func sorted(a, b string) []string {
	if a > b {
		a, b = b, a
	}
	return []string{a, b}
}

// TestLatestIsWhatTheFleetRuns: a new device installs the newest release
// rolled out to the whole fleet: publishing alone, or a rollout to a
// percent or to labels, does not change it; an aborted rollout takes its
// release back. Before any release went to the whole fleet, the newest
// one is installed (a new fleet's first device).
func TestLatestIsWhatTheFleetRuns(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	p := open(t, t.TempDir(), key)
	defer p.store.Close()
	ctx := context.Background()
	publish := func(v string) {
		t.Helper()
		bin := []byte("agent " + v)
		manifest, sig := key.Sign(t, controlplanetest.Manifest(v, map[string][]byte{"arm64": bin}))
		if _, err := p.mgr.Publish(ctx, manifest, sig); err != nil {
			t.Fatal(err)
		}
		if _, err := p.mgr.PutArtifact(ctx, v, "arm64", bytes.NewReader(bin)); err != nil {
			t.Fatal(err)
		}
	}
	latest := func(want string) {
		t.Helper()
		rel, ok, err := p.mgr.Latest(ctx)
		if err != nil || !ok || rel.Version != want {
			t.Fatalf("new devices install %s (%v %v), want %s", rel.Version, ok, err, want)
		}
	}
	publish("v1.0.0")
	publish("v1.1.0")
	latest("v1.1.0") // none went to the fleet yet
	if _, err := p.mgr.Start(ctx, "v1.0.0", nil, 100); err != nil {
		t.Fatal(err)
	}
	latest("v1.0.0")
	publish("v1.2.0")
	latest("v1.0.0")
	if _, err := p.mgr.Start(ctx, "v1.2.0", nil, 10); err != nil {
		t.Fatal(err)
	}
	latest("v1.0.0")
	if _, err := p.mgr.Start(ctx, "v1.2.0", map[string]string{"site": "lab"}, 100); err != nil {
		t.Fatal(err)
	}
	latest("v1.0.0")
	if _, err := p.mgr.Start(ctx, "v1.2.0", nil, 10); err != nil {
		t.Fatal(err)
	}
	if _, err := p.mgr.SetPercent(ctx, 100); err != nil {
		t.Fatal(err)
	}
	latest("v1.2.0")
	if _, err := p.mgr.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	latest("v1.0.0")
}
