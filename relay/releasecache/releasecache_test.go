package releasecache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/relay/releasecache"
)

// counting counts the downloads a cache asks of the real control plane
// client.
type counting struct {
	controlplane.Releases
	opens atomic.Int32
}

func (c *counting) OpenArtifact(ctx context.Context, version, arch string, off int64) (io.ReadCloser, int64, error) {
	c.opens.Add(1)
	return c.Releases.OpenArtifact(ctx, version, arch, off)
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestCacheDownloadsOnceAndChecks(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: key.Keys})
	nc := e.Relay(0, "relay-a")
	nc.PlanTTL = time.Nanosecond // no caching upstream: Latest is asked right after the publish
	up := &counting{Releases: nc}
	dir := t.TempDir()
	newCache := func() *releasecache.Cache {
		c, err := releasecache.New(releasecache.Config{Upstream: up, Dir: dir, Keys: key.Keys, LatestTTL: 1})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := newCache()
	ctx := t.Context()
	if _, ok, err := c.Latest(ctx); ok || err != nil {
		t.Fatalf("latest before any release: %v %v", ok, err)
	}
	bin := random(1 << 20)
	e.Publish(key, "v1.4.0", map[string][]byte{"arm64": bin})
	rel, ok, err := c.Latest(ctx)
	if err != nil || !ok || rel.Version != "v1.4.0" {
		t.Fatalf("latest: %v %v %v", rel.Version, ok, err)
	}

	// Ten agents fetch at once: one download over NATS.
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		wg.Go(func() {
			off := int64(i * 1000)
			r, size, err := c.OpenArtifact(ctx, "v1.4.0", "arm64", off)
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			got, err := io.ReadAll(r)
			if err != nil || size != int64(len(bin)) || !bytes.Equal(got, bin[off:]) {
				errs <- errors.New("wrong bytes")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := up.opens.Load(); n != 1 {
		t.Fatalf("%d downloads from the control plane for ten concurrent fetches, want 1", n)
	}

	// A cached file damaged on disk is noticed by the next process (its
	// first open hashes it) and fetched again.
	path := filepath.Join(dir, "v1.4.0", "tether-agent-linux-arm64")
	damaged := bytes.Clone(bin)
	damaged[500] ^= 1
	if err := os.WriteFile(path, damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	c2 := newCache()
	r, _, err := c2.OpenArtifact(ctx, "v1.4.0", "arm64", 0) // manifest read back from disk
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(r)
	r.Close()
	if !bytes.Equal(got, bin) || up.opens.Load() != 2 {
		t.Fatalf("after damage: equal %v, downloads %d", bytes.Equal(got, bin), up.opens.Load())
	}
	if _, _, err := c2.OpenArtifact(ctx, "v1.4.0", "riscv64", 0); controlplane.KindOf(err) != controlplane.KindNotFound {
		t.Fatalf("missing arch: %v", err)
	}
	if _, _, err := c2.OpenArtifact(ctx, "v9.0.0", "arm64", 0); controlplane.KindOf(err) != controlplane.KindNotFound {
		t.Fatalf("unknown version: %v", err)
	}
}

// TestCacheRefusesUntrustedReleases: a release the control plane accepted
// but the relay's keys do not verify is neither offered nor served.
func TestCacheRefusesUntrustedReleases(t *testing.T) {
	trusted, other := controlplanetest.NewReleaseKey(t), controlplanetest.NewReleaseKey(t)
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: append(trusted.Keys, other.Keys...)})
	relay := e.Relay(0, "relay-a")
	c, err := releasecache.New(releasecache.Config{Upstream: relay, Dir: t.TempDir(), Keys: trusted.Keys, LatestTTL: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	e.Publish(other, "v2.0.0", map[string][]byte{"arm64": random(100)})
	if _, ok, err := c.Latest(ctx); ok || !errors.Is(err, release.ErrUnverified) {
		t.Fatalf("latest signed by an untrusted key: %v %v", ok, err)
	}
	if _, err := e.CP.Releases.Start(ctx, "v2.0.0", nil, 100); err != nil {
		t.Fatal(err)
	}
	d := e.Enroll(relay, "pi01")
	hs := d.Handshake("relay-a")
	hs.AgentVersion = "v1.0.0"
	if _, err := relay.Connect(ctx, hs); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := relay.Offer(ctx, d.ID, "v1.0.0"); !ok || err != nil {
		t.Fatalf("the control plane does not offer v2.0.0: %v %v", ok, err)
	}
	if _, ok, err := c.Offer(ctx, d.ID, "v1.0.0"); ok || !errors.Is(err, release.ErrUnverified) {
		t.Fatalf("offer of a release the relay cannot verify: %v %v", ok, err)
	}
	if _, _, err := c.OpenArtifact(ctx, "v2.0.0", "arm64", 0); err == nil {
		t.Fatal("served a binary of an unverified release")
	}
	// No keys at all: nothing.
	none, _ := releasecache.New(releasecache.Config{Upstream: relay, Dir: t.TempDir()})
	if _, ok, err := none.Latest(ctx); ok || err != nil {
		t.Fatalf("latest without keys: %v %v", ok, err)
	}
}
