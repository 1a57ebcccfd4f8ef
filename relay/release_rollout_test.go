package relay_test

import (
	"bytes"
	"crypto/ed25519"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/releasecache"
)

// simAgent is a device's session speaking frames by hand, announcing a
// release version; it records the update offers it gets.
type simAgent struct {
	id string
	ra *relaytest.RawAgent

	mu     sync.Mutex
	offers []string
}

func connectSim(t *testing.T, e *relaytest.Env, name, version string) *simAgent {
	t.Helper()
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, name)
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ra.Version = version
	ra.Handshake(t, key)
	return &simAgent{id: frames.DeviceID(ra.Pub[:]), ra: ra}
}

// run reads the relay's frames and sends heartbeats until done closes
// (then it closes the session).
func (a *simAgent) run(done <-chan struct{}) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		t := time.NewTicker(relaytest.RawHeartbeat / 2)
		defer t.Stop()
		for seq := uint64(1); ; seq++ {
			select {
			case <-done:
				a.ra.Mux.Close() // ends the reader below
				return
			case <-t.C:
			}
			if frames.Write(a.ra.Ctrl, &frames.Heartbeat{Seq: seq}) != nil {
				return
			}
		}
	})
	for {
		m, err := frames.Read(a.ra.Ctrl, 0)
		if err != nil {
			return
		}
		if o, ok := m.(*frames.UpdateOffer); ok {
			a.mu.Lock()
			a.offers = append(a.offers, o.Version)
			a.mu.Unlock()
		}
	}
}

func (a *simAgent) offered() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.offers)
}

// offeredSet waits until n agents were offered the release, then as long
// again as three offer rounds, and returns the agents offered.
func offeredSet(t *testing.T, agents []*simAgent, n int, round time.Duration) map[string]bool {
	t.Helper()
	count := func() map[string]bool {
		got := map[string]bool{}
		for _, a := range agents {
			if o := a.offered(); len(o) > 0 {
				if len(o) > 1 || o[0] != "v1.4.0" {
					t.Fatalf("%s was offered %v", a.id, o)
				}
				got[a.id] = true
			}
		}
		return got
	}
	relaytest.Eventually(t, 20*time.Second, func() error {
		if got := len(count()); got < n {
			return fmt.Errorf("%d of %d offered", got, n)
		}
		return nil
	})
	// None beyond n: every session asks again within 1.5 rounds.
	deadline := time.Now().Add(3 * round)
	for time.Now().Before(deadline) {
		if got := count(); len(got) > n {
			t.Fatalf("%d offered, want %d", len(got), n)
		}
		time.Sleep(20 * time.Millisecond) // polling the agents' records
	}
	return count()
}

// TestRolloutOffersOnSessions: 50 simulated devices on a relay with the
// real release stack (control plane plan, NATS client cache, relay
// cache); a rollout to 10% offers the release on exactly 5 sessions,
// the ones release.Choose names; raising it to 50% offers it to 20 more
// and to none of the first again.
func TestRolloutOffersOnSessions(t *testing.T) {
	const round = 300 * time.Millisecond
	key := controlplanetest.NewReleaseKey(t)
	e := relaytest.Start(t, relaytest.Options{ReleaseKeys: key.Keys, RelayConfig: func(c *relay.Config) {
		cache, err := releasecache.New(releasecache.Config{Upstream: c.ControlPlane.(controlplane.Releases), Dir: t.TempDir(), Keys: key.Keys})
		if err != nil {
			t.Fatal(err)
		}
		c.Releases = cache
		c.UpdateInterval = round
	}})
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(done); wg.Wait() }()
	var agents []*simAgent
	for i := range 50 {
		a := connectSim(t, e, fmt.Sprintf("sim%02d", i), "v1.3.0")
		wg.Go(func() { a.run(done) }) // heartbeats from now on
		agents = append(agents, a)
	}

	ctx := t.Context()
	bin := []byte("agent v1.4.0 for amd64")
	manifest, sig := key.Sign(t, controlplanetest.Manifest("v1.4.0", map[string][]byte{"amd64": bin}))
	if _, err := e.CP.Releases.Publish(ctx, manifest, sig); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CP.Releases.PutArtifact(ctx, "v1.4.0", "amd64", bytes.NewReader(bin)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.CP.Releases.Start(ctx, "v1.4.0", nil, 10); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(agents))
	for i, a := range agents {
		ids[i] = a.id
	}
	at10 := offeredSet(t, agents, 5, round)
	if want := release.Choose(ids, "v1.4.0", 10, nil); !slices.Equal(slices.Sorted(maps.Keys(at10)), slices.Sorted(slices.Values(want))) {
		t.Fatalf("offered %v, release.Choose says %v", slices.Sorted(maps.Keys(at10)), want)
	}
	t.Logf("10%% of 50 simulated devices: %d offered", len(at10))

	if _, err := e.CP.Releases.SetPercent(ctx, 50); err != nil {
		t.Fatal(err)
	}
	at50 := offeredSet(t, agents, 25, round)
	for id := range at10 {
		if !at50[id] {
			t.Fatalf("%s lost its offer when the percent rose", id)
		}
	}
	t.Logf("50%%: %d offered", len(at50))
}
