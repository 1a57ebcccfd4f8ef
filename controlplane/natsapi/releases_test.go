package natsapi_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/frames"
)

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// enrollFleet enrolls n devices with labels, each running agentVersion.
func enrollFleet(t *testing.T, e *controlplanetest.Env, c *natsapi.Client, prefix string, n int, labels map[string]string, agentVersion string) []controlplanetest.Device {
	t.Helper()
	tok, _, err := e.CP.Store.CreateToken(t.Context(), n, time.Hour, labels)
	if err != nil {
		t.Fatal(err)
	}
	var out []controlplanetest.Device
	for i := range n {
		d := controlplanetest.NewDevice(prefix + string(rune('a'+i/26)) + string(rune('a'+i%26)))
		if _, err := c.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok),
			EnrollDevice: frames.EnrollDevice{PublicKey: d.Pub, Name: d.Name, AgentVersion: agentVersion}}); err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

func offered(t *testing.T, c *natsapi.Client, devices []controlplanetest.Device, agentVersion string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, d := range devices {
		rel, ok, err := c.Offer(t.Context(), d.ID, agentVersion)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			if rel.Version != "v1.4.0" {
				t.Fatalf("offered %s", rel.Version)
			}
			out[d.ID] = true
		}
	}
	return out
}

// waitPlan waits until the relay's cached plan has the rollout in state
// at percent: its cache reacts to the release event on its own
// subscription. At most 10s.
func waitPlan(t *testing.T, c *natsapi.Client, state string, percent int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p, err := c.Plan(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if p.Rollout != nil && p.Rollout.State == state && p.Rollout.Percent == percent {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("relay's plan %+v, want %s at %d%%: not within 10s", p.Rollout, state, percent)
		}
		time.Sleep(5 * time.Millisecond) // polling the client's cache
	}
}

// TestRollout: a staged rollout over real NATS, from publishing to
// offers at 10% then 50% of the devices a label selects, reports, pause,
// resume and abort, and the binaries fetched in checked chunks.
func TestRollout(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: key.Keys})
	ctx := t.Context()
	relay := e.Relay(0, "relay-a")

	if _, ok, err := relay.Offer(ctx, "nobody", "v1.3.0"); ok || err != nil {
		t.Fatalf("offer without a rollout: %v %v", ok, err)
	}
	if _, ok, err := relay.Latest(ctx); ok || err != nil {
		t.Fatalf("latest without a release: %v %v", ok, err)
	}
	binaries := map[string][]byte{"arm64": randomBytes(1300 << 10), "amd64": randomBytes(1 << 10)}
	e.Publish(key, "v1.3.0", map[string][]byte{"arm64": randomBytes(100)})
	manifest, sig := e.Publish(key, "v1.4.0", binaries)

	lab := enrollFleet(t, e, relay, "lab", 50, map[string]string{"site": "lab"}, "v1.3.0")
	field := enrollFleet(t, e, relay, "field", 10, map[string]string{"site": "field"}, "v1.3.0")
	dev := enrollFleet(t, e, relay, "dev", 1, map[string]string{"site": "lab"}, "dev")

	if _, err := e.CP.Releases.Start(ctx, "v1.4.0", map[string]string{"site": "lab"}, 10); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutActive, 10)
	at10 := offered(t, relay, lab, "v1.3.0")
	if len(at10) != 5 {
		t.Fatalf("10%% of 50 lab devices: %d offered, want 5", len(at10))
	}
	if got := offered(t, relay, field, "v1.3.0"); len(got) != 0 {
		t.Fatalf("devices outside the labels were offered: %d", len(got))
	}
	if got := offered(t, relay, dev, "dev"); len(got) != 0 {
		t.Fatal("a development build was offered")
	}
	// Not what the device already runs, nor a downgrade.
	for id := range at10 {
		for _, v := range []string{"v1.4.0", "v1.5.0", "dev"} {
			if _, ok, _ := relay.Offer(ctx, id, v); ok {
				t.Fatalf("offered v1.4.0 to a device running %s", v)
			}
		}
	}
	rel, ok, err := relay.Offer(ctx, firstKey(at10), "v1.3.0")
	if err != nil || !ok || !bytes.Equal(rel.Manifest, manifest) || !bytes.Equal(rel.Signature, sig) {
		t.Fatalf("the offer is not the release as signed: %v %v", ok, err)
	}

	// 50%: a superset, exactly 25.
	if _, err := e.CP.Releases.SetPercent(ctx, 50); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutActive, 50)
	at50 := offered(t, relay, lab, "v1.3.0")
	if len(at50) != 25 {
		t.Fatalf("50%% of 50: %d offered", len(at50))
	}
	for id := range at10 {
		if !at50[id] {
			t.Fatal("raising the percent deselected a device")
		}
	}

	// Reports: a device that rolled back is not offered again, by this
	// relay at once, by another from its first plan; a healthy one is up
	// to date.
	var rolledBack, healthy string
	for id := range at10 {
		if rolledBack == "" {
			rolledBack = id
		} else if healthy == "" {
			healthy = id
		}
	}
	for _, r := range []controlplane.UpdateReport{
		{DeviceID: rolledBack, Version: "v1.4.0", State: frames.UpdateDownloading, Relay: "relay-a"},
		{DeviceID: rolledBack, Version: "v1.4.0", State: frames.UpdateRolledBack, Reason: "no heartbeat within 2m", Relay: "relay-a"},
		{DeviceID: healthy, Version: "v1.4.0", State: frames.UpdateHealthy, Relay: "relay-a"},
	} {
		if err := relay.ReportUpdate(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok, _ := relay.Offer(ctx, rolledBack, "v1.3.0"); ok {
		t.Fatal("offered again after rolling back (same relay)")
	}
	other := e.Relay(0, "relay-b")
	if _, ok, _ := other.Offer(ctx, rolledBack, "v1.3.0"); ok {
		t.Fatal("offered again after rolling back (another relay)")
	}
	if _, ok, _ := other.Offer(ctx, firstOther(at50, rolledBack), "v1.3.0"); !ok {
		t.Fatal("another chosen device is not offered by the other relay")
	}
	for _, bad := range []controlplane.UpdateReport{
		{DeviceID: "unknown", Version: "v1.4.0", State: frames.UpdateHealthy},
		{DeviceID: healthy, Version: "v9.9.9", State: frames.UpdateHealthy},
		{DeviceID: healthy, Version: "v1.4.0", State: "exploded"},
	} {
		if err := relay.ReportUpdate(ctx, bad); err == nil {
			t.Fatalf("report %+v accepted", bad)
		}
	}
	st, err := e.CP.Releases.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Matching != 51 || st.Chosen != 25 || st.States[frames.UpdateRolledBack] != 1 || st.States[frames.UpdateHealthy] != 1 ||
		st.States[controlplane.UpdatePending] != 23 || st.States[controlplane.UpdateNotSelected] != 25 || st.States[controlplane.UpdateDevBuild] != 1 ||
		st.Versions["v1.3.0"] != 50 || st.Versions["dev"] != 1 {
		t.Fatalf("status: matching %d chosen %d states %v versions %v", st.Matching, st.Chosen, st.States, st.Versions)
	}

	// Pause, resume, abort reach relays through the release event.
	if _, err := e.CP.Releases.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutPaused, 50)
	if got := offered(t, relay, lab, "v1.3.0"); len(got) != 0 {
		t.Fatalf("%d offered while paused", len(got))
	}
	if _, err := e.CP.Releases.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutActive, 50)
	if got := offered(t, relay, lab, "v1.3.0"); len(got) != 24 {
		t.Fatalf("%d offered once resumed, want 24 (25 less the one rolled back)", len(got))
	}
	if _, err := e.CP.Releases.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutAborted, 50)
	if got := offered(t, relay, lab, "v1.3.0"); len(got) != 0 {
		t.Fatalf("%d offered once aborted", len(got))
	}
	if _, err := e.CP.Releases.Resume(ctx); controlplane.KindOf(err) != controlplane.KindConflict {
		t.Fatalf("resume an aborted rollout: %v", err)
	}

	// Latest is the highest version (asked through relay-b: relay-a
	// cached "none" at the start, until a release event it may not have
	// seen yet).
	if rel, ok, err := other.Latest(ctx); err != nil || !ok || rel.Version != "v1.4.0" {
		t.Fatalf("latest: %s %v %v", rel.Version, ok, err)
	}

	// Binaries: whole (three chunks), from an offset, and a tampered copy
	// on the control plane's disk is caught.
	for _, off := range []int64{0, 700 << 10, 1300 << 10} {
		r, size, err := relay.OpenArtifact(ctx, "v1.4.0", "arm64", off)
		if err != nil || size != 1300<<10 {
			t.Fatalf("open at %d: size %d %v", off, size, err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		if err != nil || !bytes.Equal(got, binaries["arm64"][off:]) {
			t.Fatalf("read from %d: %d bytes, %v", off, len(got), err)
		}
	}
	if _, _, err := relay.OpenArtifact(ctx, "v1.4.0", "riscv64", 0); controlplane.KindOf(err) != controlplane.KindNotFound {
		t.Fatalf("missing arch: %v", err)
	}
	path := filepath.Join(e.DataDir, "releases", "v1.4.0", "tether-agent-linux-arm64")
	tampered := bytes.Clone(binaries["arm64"])
	tampered[len(tampered)-1] ^= 1
	if err := os.WriteFile(path, tampered, 0o600); err != nil {
		t.Fatal(err)
	}
	r, _, err := relay.OpenArtifact(ctx, "v1.4.0", "arm64", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(r); err == nil {
		t.Fatal("a binary whose SHA-256 differs from the manifest read without error")
	}
}

func firstKey(m map[string]bool) string {
	for k := range m {
		return k
	}
	return ""
}

func firstOther(m map[string]bool, not string) string {
	for k := range m {
		if k != not {
			return k
		}
	}
	return ""
}

// TestPublishRefuses: the control plane takes only releases signed by its
// keys, binaries as the manifest says, and never replaces a version.
func TestPublishRefuses(t *testing.T) {
	key, stranger := controlplanetest.NewReleaseKey(t), controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: key.Keys})
	ctx := t.Context()
	bin := randomBytes(4096)
	m := controlplanetest.Manifest("v2.0.0", map[string][]byte{"arm64": bin})

	man, sig := stranger.Sign(t, m)
	if _, err := e.CP.Releases.Publish(ctx, man, sig); controlplane.KindOf(err) != controlplane.KindInvalid {
		t.Fatalf("another key's release: %v", err)
	}
	man, sig = key.Sign(t, m)
	if _, err := e.CP.Releases.Publish(ctx, append(bytes.Clone(man), ' '), sig); controlplane.KindOf(err) != controlplane.KindInvalid {
		t.Fatalf("a modified manifest: %v", err)
	}
	info, err := e.CP.Releases.Publish(ctx, man, sig)
	if err != nil || info.Complete || len(info.Missing) != 1 {
		t.Fatalf("publish: %+v %v", info, err)
	}
	if _, err := e.CP.Releases.Start(ctx, "v2.0.0", nil, 100); controlplane.KindOf(err) != controlplane.KindNotFound {
		t.Fatalf("rollout of an incomplete release: %v", err)
	}
	wrong := bytes.Clone(bin)
	wrong[0] ^= 1
	for name, body := range map[string][]byte{"short": bin[:100], "long": append(bytes.Clone(bin), 0), "other bytes": wrong} {
		if _, err := e.CP.Releases.PutArtifact(ctx, "v2.0.0", "arm64", bytes.NewReader(body)); controlplane.KindOf(err) != controlplane.KindInvalid {
			t.Fatalf("%s binary: %v", name, err)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(e.DataDir, "releases", "v2.0.0"))
	if len(entries) != 0 {
		t.Fatalf("refused binaries left files: %v", entries)
	}
	info, err = e.CP.Releases.PutArtifact(ctx, "v2.0.0", "arm64", bytes.NewReader(bin))
	if err != nil || !info.Complete {
		t.Fatalf("upload: %+v %v", info, err)
	}
	// Publishing again is harmless; another manifest for the version is not.
	if _, err := e.CP.Releases.Publish(ctx, man, sig); err != nil {
		t.Fatalf("publish again: %v", err)
	}
	m.Floor = "v2.0.0"
	man2, sig2 := key.Sign(t, m)
	if _, err := e.CP.Releases.Publish(ctx, man2, sig2); controlplane.KindOf(err) != controlplane.KindConflict {
		t.Fatalf("another manifest for v2.0.0: %v", err)
	}
	// No keys: nothing is accepted.
	bare := controlplanetest.Start(t, controlplanetest.Options{})
	if _, err := bare.CP.Releases.Publish(ctx, man, sig); controlplane.KindOf(err) != controlplane.KindInvalid {
		t.Fatalf("publish without keys: %v", err)
	}
}

// TestRelayCannotTouchReleases: relay credentials cannot answer release
// requests as the control plane (and so serve another binary), cannot
// forge release events, and find no NATS subject that publishes a
// release or changes a rollout.
func TestRelayCannotTouchReleases(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{Cluster: true, ReleaseKeys: key.Keys})
	relay := e.Relay(relayNode, "relay-a")
	e.Publish(key, "v1.4.0", map[string][]byte{"arm64": randomBytes(1000)})
	for _, subject := range []string{controlplane.SubjectReleaseArtifact, controlplane.SubjectReleasePlan, controlplane.SubjectReleaseGet, controlplane.SubjectReleaseReport} {
		a := newAttacker(t, e)
		if _, err := a.nc.QueueSubscribe(subject, "q", func(m *nats.Msg) { m.Respond([]byte(`{"result":{}}`)) }); err != nil {
			t.Fatal(err)
		}
		a.violation(t, "subscribe "+subject)
	}
	a := newAttacker(t, e)
	if err := a.nc.Publish(controlplane.SubjectReleaseEvents, []byte(`{"kind":"rollout"}`)); err != nil {
		t.Fatal(err)
	}
	a.nc.Flush()
	a.violation(t, "publish "+controlplane.SubjectReleaseEvents)
	for _, subject := range []string{"tether.cp.release-publish", "tether.cp.rollout-start", "tether.cp.release-artifact-put"} {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := newAttacker(t, e).nc.RequestWithContext(ctx, subject, []byte(`{}`))
		cancel()
		if !errors.Is(err, nats.ErrNoResponders) {
			t.Fatalf("request %s: %v, want no responders", subject, err)
		}
	}
	// The real relay still gets the real binary.
	r, _, err := relay.OpenArtifact(t.Context(), "v1.4.0", "arm64", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatal(err)
	}
}

// TestOfferWhileControlPlaneAway: a relay keeps offering from its last
// plan while the control plane cannot be reached.
func TestOfferWhileControlPlaneAway(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: key.Keys})
	ctx := t.Context()
	relay := e.Relay(0, "relay-a")
	e.Publish(key, "v1.4.0", map[string][]byte{"arm64": randomBytes(100)})
	devices := enrollFleet(t, e, relay, "pi", 4, nil, "v1.3.0")
	if _, err := e.CP.Releases.Start(ctx, "v1.4.0", nil, 100); err != nil {
		t.Fatal(err)
	}
	waitPlan(t, relay, controlplane.RolloutActive, 100)
	if got := offered(t, relay, devices, "v1.3.0"); len(got) != 4 {
		t.Fatalf("%d offered", len(got))
	}
	e.CP.Close()
	// Every offer now asks, finds no control plane, and keeps the last plan.
	relay.PlanTTL = time.Nanosecond
	if got := offered(t, relay, devices, "v1.3.0"); len(got) != 4 {
		t.Fatalf("%d offered with the control plane away", len(got))
	}
	if _, _, err := relay.Latest(ctx); controlplane.KindOf(err) != controlplane.KindUnavailable {
		t.Fatalf("latest with the control plane away: %v", err)
	}
}
