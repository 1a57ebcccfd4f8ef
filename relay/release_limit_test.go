package relay_test

import (
	"net/http"
	"testing"

	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestReleaseDownloadsLimited: one client address gets DefaultReleaseLimit's
// burst of /install.sh and release downloads, then 429 with Retry-After;
// another address still gets them.
func TestReleaseDownloadsLimited(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) { c.ReleaseLimit = relay.DefaultReleaseLimit }})
	get := func(c *http.Client) (int, string) {
		resp, err := c.Get("https://" + e.HTTPSAddr() + "/install.sh")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Retry-After")
	}
	hog := clientFrom(e, "127.0.0.40")
	served := 0
	for range 40 {
		code, retry := get(hog)
		if code == http.StatusTooManyRequests {
			if retry == "" {
				t.Fatal("429 without Retry-After")
			}
			break
		}
		served++
	}
	if served != 30 {
		t.Fatalf("%d downloads from one address before 429, want 30", served)
	}
	if code, _ := get(clientFrom(e, "127.0.0.41")); code == http.StatusTooManyRequests {
		t.Fatal("another address was refused")
	}
	t.Logf("release downloads: %d from one address, then 429", served)
}
