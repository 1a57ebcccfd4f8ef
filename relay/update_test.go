package relay_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// updateAgent is a raw agent at version v1.0.0 on a relay that offers the
// control plane's rollouts, with a release v2.0.0 of binary rolled out.
func updateAgent(t *testing.T, binary []byte) (*relaytest.Env, *relaytest.RawAgent, controlplanetest.ReleaseKey) {
	t.Helper()
	key := controlplanetest.NewReleaseKey(t)
	e := relaytest.Start(t, relaytest.Options{ReleaseKeys: key.Keys, RelayConfig: func(c *relay.Config) {
		c.Releases = c.ControlPlane.(controlplane.Releases)
		c.UpdateInterval = time.Second
	}})
	manifest, sig := key.Sign(t, controlplanetest.Manifest("v2.0.0", map[string][]byte{"amd64": binary}))
	ctx := t.Context()
	if _, err := e.CP.Releases.Publish(ctx, manifest, sig); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CP.Releases.PutArtifact(ctx, "v2.0.0", "amd64", bytes.NewReader(binary)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CP.Releases.Start(ctx, "v2.0.0", nil, 100); err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, priv, "updater")
	return e, connectV1(t, e, priv), key
}

// connectV1 opens a session of the device with key priv, its agent at
// v1.0.0.
func connectV1(t *testing.T, e *relaytest.Env, priv ed25519.PrivateKey) *relaytest.RawAgent {
	t.Helper()
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ra.Version = "v1.0.0"
	ra.Handshake(t, priv, frames.Service{Name: "web", Proto: "http"})
	return ra
}

// waitOffer heartbeats every 500ms until the relay offers an update (at
// most 60s).
func waitOffer(t *testing.T, ra *relaytest.RawAgent) *frames.UpdateOffer {
	t.Helper()
	end := time.Now().Add(60 * time.Second)
	next := time.Now()
	for seq := uint64(1); time.Now().Before(end); {
		if time.Now().After(next) {
			ra.Send(t, &frames.Heartbeat{Seq: seq})
			seq++
			next = time.Now().Add(500 * time.Millisecond)
		}
		ra.Ctrl.SetReadDeadline(next)
		m, err := frames.Read(ra.Ctrl, 0)
		ra.Ctrl.SetReadDeadline(time.Time{})
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if o, ok := m.(*frames.UpdateOffer); ok {
			return o
		}
	}
	t.Fatal("no update offer within 60s")
	return nil
}

// fetch opens a stream, sends f and returns the stream and the relay's
// answer (nil when it closed the stream unanswered). After a refusal it
// reads the stream to its end.
func fetch(t *testing.T, ra *relaytest.RawAgent, f *frames.Fetch) (*smux.Stream, frames.Message) {
	t.Helper()
	st, err := ra.Mux.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := frames.WriteTimeout(st, f, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := frames.Read(st, 0)
	if err != nil {
		return st, nil
	}
	if _, ok := m.(*frames.StreamRefuse); ok {
		// The relay then closes the stream, and may serve another.
		if _, err := io.Copy(io.Discard, st); err != nil && !errors.Is(err, io.EOF) { // smux's WriteTo returns EOF
			t.Fatalf("after a refusal: %v", err)
		}
	}
	return st, m
}

func wantRefused(t *testing.T, m frames.Message, reason string) {
	t.Helper()
	r, ok := m.(*frames.StreamRefuse)
	if !ok || !bytes.Contains([]byte(r.Message), []byte(reason)) {
		t.Fatalf("answer %#v, want a refusal saying %q", m, reason)
	}
}

// TestUpdateOfferAndFetch: the relay offers the rolled-out release to a
// v1 agent, serves its binary (from an offset too) only for what it
// offered, one download at a time, and records the agent's reports.
func TestUpdateOfferAndFetch(t *testing.T) {
	binary := make([]byte, 2<<20) // more than a stream's window (512 KiB)
	rand.Read(binary)
	e, ra, key := updateAgent(t, binary)

	// Nothing is served before it is offered.
	_, m := fetch(t, ra, &frames.Fetch{Version: "v9.9.9", Arch: "amd64"})
	wantRefused(t, m, "not offered")

	o := waitOffer(t, ra)
	if o.Version != "v2.0.0" {
		t.Fatalf("offered %s", o.Version)
	}
	if _, err := release.Verify(o.Manifest, o.Signature, key.Keys); err != nil {
		t.Fatalf("offer does not verify: %v", err)
	}
	ra.KeepAlive(t) // downloads under -race outlast three heartbeat intervals

	for _, off := range []int{0, 1000, len(binary)} {
		st, m := fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "amd64", Offset: uint64(off)})
		if _, ok := m.(*frames.StreamAccept); !ok {
			t.Fatalf("offset %d: answer %#v", off, m)
		}
		st.SetReadDeadline(time.Now().Add(30 * time.Second))
		var got bytes.Buffer
		if _, err := got.ReadFrom(st); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("offset %d: %v", off, err)
		}
		if !bytes.Equal(got.Bytes(), binary[off:]) {
			t.Fatalf("offset %d: %d bytes, not the binary's last %d", off, got.Len(), len(binary)-off)
		}
		st.Close()
	}

	// A stream that is not a download is closed unanswered.
	st, err := ra.Mux.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	frames.WriteTimeout(st, &frames.StreamOpen{Service: "web", ClientAddr: "192.0.2.1:1"}, 5*time.Second)
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	var rest bytes.Buffer
	if _, err := rest.ReadFrom(st); (err != nil && !errors.Is(err, io.EOF)) || rest.Len() != 0 {
		t.Fatalf("a stream-open from the agent got %q, %v", rest.Bytes(), err)
	}
	st.Close()

	_, m = fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "mips64"})
	wantRefused(t, m, "mips64")
	_, m = fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "amd64", Offset: uint64(len(binary) + 1)})
	wantRefused(t, m, "range")

	// One download at a time: while one is served (not read: the relay
	// waits on the agent's window), another stream is closed unanswered.
	busy, m := fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "amd64"})
	if _, ok := m.(*frames.StreamAccept); !ok {
		t.Fatalf("answer %#v", m)
	}
	if _, m := fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "amd64"}); m != nil {
		t.Fatalf("second download answered %#v", m)
	}
	busy.Close()

	ra.Send(t, &frames.UpdateStatus{Version: "v2.0.0", State: frames.UpdateFailed, Reason: "disk full"})
	err = poll(t, 10*time.Second, func() error {
		rs, err := e.CP.Store.UpdateReports(context.Background(), "v2.0.0")
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.State == frames.UpdateFailed && r.Reason == "disk full" && r.Relay != "" {
				return nil
			}
		}
		return fmt.Errorf("reports %v", rs)
	})
	if err != nil {
		t.Fatal(err)
	}

	// A flood of statuses is cut to a few.
	for range 20 {
		ra.Send(t, &frames.UpdateStatus{Version: "v2.0.0", State: frames.UpdateDownloading})
	}
	err = poll(t, 10*time.Second, func() error {
		if n := e.Counter("tether_relay_update_reports_total", "dropped"); n < 10 {
			return fmt.Errorf("%v statuses dropped", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for result, least := range map[string]float64{"served": 3, "refused": 3, "busy": 1} {
		if n := e.Counter("tether_relay_update_downloads_total", result); n < least {
			t.Errorf("%v downloads %s, want at least %v", n, result, least)
		}
	}
	if n := e.Counter("tether_relay_update_offers_total", ""); n != 1 {
		t.Errorf("%v offers, want 1", n)
	}

	// On a new session, the release the control plane would offer is
	// served before the session's first offer: an agent resuming a
	// download its previous session was offered.
	ra.Mux.Close()
	ra = connectV1(t, e, ra.Key)
	st, m = fetch(t, ra, &frames.Fetch{Version: "v2.0.0", Arch: "amd64", Offset: uint64(len(binary) - 1000)})
	if _, ok := m.(*frames.StreamAccept); !ok {
		t.Fatalf("resumed download: answer %#v", m)
	}
	st.SetReadDeadline(time.Now().Add(30 * time.Second))
	var tail bytes.Buffer
	if _, err := tail.ReadFrom(st); (err != nil && !errors.Is(err, io.EOF)) || !bytes.Equal(tail.Bytes(), binary[len(binary)-1000:]) {
		t.Fatalf("resumed download: %d bytes, %v", tail.Len(), err)
	}
	st.Close()
}

// poll calls cond every 50ms until it returns nil or within passes.
func poll(t *testing.T, within time.Duration, cond func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-t.Context().Done():
			return t.Context().Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
