package agent

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
)

// TestEnrollmentAnswers: only the relay's own JSON refusal is final; a
// redirect is never followed; pages from something else are retried.
func TestEnrollmentAnswers(t *testing.T) {
	var stolen atomic.Int32
	thief := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { stolen.Add(1) }))
	defer thief.Close()
	for _, tc := range []struct {
		name   string
		answer func(w http.ResponseWriter)
		final  bool
		says   string
	}{
		{"relay refuses", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"error":"enrollment token is not valid"}`))
		}, true, "token is not valid"},
		{"proxy page 403", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusForbidden)
			w.Write([]byte(`<html>blocked</html>`))
		}, false, "HTTP 403"},
		{"timeout 408 with JSON", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusRequestTimeout)
			w.Write([]byte(`{"error":"slow"}`))
		}, false, "HTTP 408"},
		{"redirect", func(w http.ResponseWriter) {
			w.Header().Set("Location", thief.URL+"/steal")
			w.WriteHeader(http.StatusTemporaryRedirect)
		}, false, "does not follow"},
		{"server error", func(w http.ResponseWriter) { w.WriteHeader(http.StatusBadGateway) }, false, "HTTP 502"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relay := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tc.answer(w) }))
			defer relay.Close()
			a := newTestAgent(t, 15*time.Second)
			a.cfg.RootCAs = relay.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
			_, err := a.enroll(t.Context(), relay.URL+frames.EnrollPath, frames.EnrollRequest{Token: "tth_x"})
			var refused *EnrollError
			if err == nil || errors.As(err, &refused) != tc.final || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("got %v (final %v), want final=%v saying %q", err, errors.As(err, &refused), tc.final, tc.says)
			}
		})
	}
	if n := stolen.Load(); n != 0 {
		t.Fatalf("the redirect target got %d requests", n)
	}
}

// TestSessionRedirectNotFollowed: the upgrade is not followed elsewhere.
func TestSessionRedirectNotFollowed(t *testing.T) {
	var stolen atomic.Int32
	thief := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { stolen.Add(1) }))
	defer thief.Close()
	relay := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "ws"+strings.TrimPrefix(thief.URL, "http")+frames.ConnectPath, http.StatusTemporaryRedirect)
	}))
	defer relay.Close()
	tlsConf := relay.Client().Transport.(*http.Transport).TLSClientConfig
	_, err := wsmux.Dial(t.Context(), "wss"+strings.TrimPrefix(relay.URL, "https")+frames.ConnectPath, wsmux.DialOptions{TLS: tlsConf.Clone()})
	var he *wsmux.HandshakeError
	if !errors.As(err, &he) || he.Status != http.StatusTemporaryRedirect {
		t.Fatalf("got %v, want a refused upgrade with status 307", err)
	}
	if stolen.Load() != 0 {
		t.Fatal("the redirect was followed")
	}
}

func TestConfigRefusesInsecureAndBadHeartbeats(t *testing.T) {
	base := func() Config {
		return Config{RelayURLs: []string{"wss://relay.test"}, StateDir: t.TempDir(), Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}}
	}
	c := base()
	c.RelayURLs = []string{"ws://relay.test"}
	if _, err := New(c); err == nil || !strings.Contains(err.Error(), "cleartext") {
		t.Fatalf("ws:// accepted: %v", err)
	}
	c = base()
	c.RelayURLs, c.Insecure = []string{"ws://relay.test"}, true
	if _, err := New(c); err != nil {
		t.Fatalf("ws:// with Insecure: %v", err)
	}
	for _, hb := range []time.Duration{500 * time.Millisecond, 11 * time.Minute} {
		c = base()
		c.HeartbeatInterval = hb
		if _, err := New(c); err == nil {
			t.Fatalf("heartbeat %v accepted", hb)
		}
	}
}

// TestLegacyServiceNameNeverEnrolls: a device not enrolled yet with a
// service name of the older grammar ('-') stops before it uses a token up:
// no relay would give that name a lease.
func TestLegacyServiceNameNeverEnrolls(t *testing.T) {
	a, err := New(Config{RelayURLs: []string{"wss://relay.test"}, StateDir: t.TempDir(), EnrollToken: "tth_x",
		Services: []Service{{Name: "my-web", Proto: "http", Addr: "127.0.0.1:1"}}, HeartbeatInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(t.Context())
	if !errors.Is(err, ErrNotEnrolled) || !strings.Contains(err.Error(), `service "my-web"`) {
		t.Fatalf("run: %v", err)
	}
}
