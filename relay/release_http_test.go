package relay_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/releasecache"
)

// TestReleaseEndpoints: /install.sh and /_tether/release/ serve the
// latest release through the relay's cache: nothing (404) before one is
// published, then the script with this relay's URL and keys, the
// manifest and signature as signed, and the binaries with Range.
func TestReleaseEndpoints(t *testing.T) {
	key := controlplanetest.NewReleaseKey(t)
	e := relaytest.Start(t, relaytest.Options{ReleaseKeys: key.Keys, RelayConfig: func(c *relay.Config) {
		up := c.ControlPlane.(*natsapi.Client)
		up.PlanTTL = time.Nanosecond // no caching upstream: the release is asked for right after it is published
		cache, err := releasecache.New(releasecache.Config{Upstream: up, Dir: t.TempDir(), Keys: key.Keys, LatestTTL: 1})
		if err != nil {
			t.Fatal(err)
		}
		c.Releases = cache
	}})
	const host = "localhost" // the relay's own name (port 443: its HTTPS listener)
	for _, path := range []string{"/install.sh", "/_tether/release/manifest.json", "/_tether/release/tether-agent-linux-arm64"} {
		if code, body := e.Get(true, host, path); code != http.StatusNotFound || !strings.Contains(body, "no agent release has been published") {
			t.Fatalf("%s before any release: %d %s", path, code, body)
		}
	}

	bins := map[string][]byte{"arm64": make([]byte, 700<<10), "armv7": make([]byte, 300<<10)}
	for _, b := range bins {
		rand.Read(b)
	}
	manifest, sig := key.Sign(t, controlplanetest.Manifest("v1.4.0", bins))
	if _, err := e.CP.Releases.Publish(t.Context(), manifest, sig); err != nil {
		t.Fatal(err)
	}
	for arch, b := range bins {
		if _, err := e.CP.Releases.PutArtifact(t.Context(), "v1.4.0", arch, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
	}

	code, script := e.Get(true, host, "/install.sh")
	if code != http.StatusOK || !strings.HasPrefix(script, "#!/bin/sh") || !strings.Contains(script, "default_relay='https://localhost'") ||
		!strings.Contains(script, key.Public) {
		t.Fatalf("install.sh: %d\n%.400s", code, script)
	}
	if code, body := e.Get(true, host, "/_tether/release/manifest.json"); code != http.StatusOK || body != string(manifest) {
		t.Fatalf("manifest.json: %d %s", code, body)
	}
	if code, body := e.Get(true, host, "/_tether/release/manifest.json.minisig"); code != http.StatusOK || body != string(sig) {
		t.Fatalf("manifest.json.minisig: %d %s", code, body)
	}
	if code, body := e.Get(true, host, "/_tether/release/tether-agent-linux-riscv64"); code != http.StatusNotFound {
		t.Fatalf("a file the manifest does not name: %d %s", code, body)
	}
	if code, _ := e.Get(true, host, "/_tether/release/../controlplane.db"); code == http.StatusOK {
		t.Fatal("a path outside the release was served")
	}

	// Concurrent first downloads, whole and by range.
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for i := range 8 {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodGet, "https://"+host+"/_tether/release/tether-agent-linux-arm64", nil)
			want, status := bins["arm64"], http.StatusOK
			if i%2 == 1 {
				req.Header.Set("Range", "bytes=1000-1999")
				want, status = bins["arm64"][1000:2000], http.StatusPartialContent
			}
			resp, err := e.Client().Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != status || !bytes.Equal(got, want) {
				errs <- resp.Status + ": wrong bytes"
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	resp, err := e.Client().Post("https://"+host+"/install.sh", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /install.sh: %s", resp.Status)
	}
}

// TestReleaseEndpointsWithoutKeys: a relay without release keys serves
// no script and no release, and says why.
func TestReleaseEndpointsWithoutKeys(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	if code, body := e.Get(true, "localhost", "/install.sh"); code != http.StatusNotFound || !strings.Contains(body, "TETHER_RELEASE_KEYS") {
		t.Fatalf("install.sh without keys: %d %s", code, body)
	}
}
