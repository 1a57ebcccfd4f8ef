package relay_test

import (
	"crypto/ed25519"
	"crypto/tls"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// These tests run the relay in-process with its real control plane and
// NATS, and speak to it with relaytest.RawAgent. The end-to-end tests
// with the real agent live in agent/e2e_*_test.go.

func TestMain(m *testing.M) { relaytest.RunWithLeakCheck(m) }

// echoHandler is a device's web service that says what it sees.
var echoHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "hello from device; host=%s xff=%s proto=%s xfh=%s path=%s",
		r.Host, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-Host"), r.URL.Path)
})

// TestPublicHTTPRoute follows public requests along the relay's HTTP
// route: by Host to a device's service, or to the page naming why not.
func TestPublicHTTPRoute(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.ServeHTTP(t, echoHandler)

	for _, tls := range []bool{false, true} {
		code, body := e.Get(tls, "web-pi01.localhost", "/x")
		proto := map[bool]string{false: "http", true: "https"}[tls]
		if code != 200 || !strings.Contains(body, "host=web-pi01.localhost") || !strings.Contains(body, "xff=127.0.0.1") ||
			!strings.Contains(body, "proto="+proto+" ") || !strings.Contains(body, "xfh=web-pi01.localhost") || !strings.Contains(body, "path=/x") {
			t.Fatalf("%s: %d %q", proto, code, body)
		}
	}
	cases := []struct {
		name, url string
		status    int
		reason    string
	}{
		{"unknown host", "https://nope.localhost/", 404, "unknown_host"},
		{"not under the domain", "http://example.org/", 404, "unknown_host"},
		{"agent path on a service host is the service's", "https://web-pi01.localhost" + frames.EnrollPath, 200, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := e.Client().Get(c.url)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != c.status || resp.Header.Get("X-Tether-Error") != c.reason {
				t.Fatalf("status %d (%q), want %d (%q)", resp.StatusCode, resp.Header.Get("X-Tether-Error"), c.status, c.reason)
			}
		})
	}

	// The device goes away: its name stays leased, and the page says so.
	ra.Mux.Close()
	e.AwaitPage(false, "web-pi01.localhost", "/", 503, "pi01 is offline", 10*time.Second)
}

func TestNewestSessionWins(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	first := e.EnrolledRaw(t, nil, "pi01")
	second := e.EnrolledRaw(t, first.Key, "pi01")
	if got := first.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeSuperseded {
		t.Fatalf("old session ended with %v, want superseded", got)
	}
	second.Send(t, &frames.Heartbeat{Seq: 1})
	if ack, ok := second.Recv(t).(*frames.HeartbeatAck); !ok || ack.Seq != 1 {
		t.Fatal("new session not served")
	}
}

func TestBadHandshakes(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	_, key, _ := ed25519.GenerateKey(nil)
	var pub [32]byte
	copy(pub[:], key.Public().(ed25519.PublicKey))
	dial := func(t *testing.T) *relaytest.RawAgent { return relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool()) }

	t.Run("signature by another key", func(t *testing.T) {
		ra := dial(t)
		ra.Send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.Recv(t).(*frames.Challenge)
		_, other, _ := ed25519.GenerateKey(nil)
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(other, frames.AuthMessage(ch.Nonce, pub, ch.RelayID)))
		ra.Send(t, auth)
		if got := ra.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("valid signature, key not enrolled", func(t *testing.T) {
		ra := dial(t)
		ra.Send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.Recv(t).(*frames.Challenge)
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(key, frames.AuthMessage(ch.Nonce, pub, ch.RelayID)))
		ra.Send(t, auth)
		if got := ra.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized || !strings.Contains(got.Message, "not enrolled") {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("replayed signature", func(t *testing.T) {
		// A signature captured from one connection is useless on the next:
		// every connection gets a fresh nonce.
		ra := dial(t)
		ra.Send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.Recv(t).(*frames.Challenge)
		old := [32]byte{1, 2, 3}
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(key, frames.AuthMessage(old, pub, ch.RelayID)))
		ra.Send(t, auth)
		if got := ra.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("no hello", func(t *testing.T) {
		ra := dial(t)
		ra.Send(t, &frames.Heartbeat{Seq: 1})
		if got := ra.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeBadRequest {
			t.Fatalf("got %v", got)
		}
	})
	// Silence until the handshake deadline: TestHandshakeDeadline, in a
	// synctest bubble.
	t.Run("old protocol version", func(t *testing.T) {
		_, resp, err := websocket.Dial(t.Context(), e.RelayURL()+frames.ConnectPath, &websocket.DialOptions{
			HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.CA.Pool()}}},
			Subprotocols: []string{"tether.v0"},
		})
		if err == nil || resp == nil || resp.StatusCode != http.StatusUpgradeRequired {
			t.Fatalf("got %v %v", resp, err)
		}
	})
}

// TestMalformedFramesCloseOnlyThatSession: garbage from one agent closes
// its session; another agent keeps being served.
func TestMalformedFramesCloseOnlyThatSession(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	good := e.EnrolledRaw(t, nil, "good", frames.Service{Name: "web", Proto: "http"})
	good.ServeHTTP(t, echoHandler)
	garbage := map[string][]byte{
		"oversized":      {byte(frames.TypeHeartbeat), 0x7f, 0xff, 0xff, 0xff},
		"truncated":      {byte(frames.TypeHeartbeat), 0, 0, 0, 2, 1, 2},
		"unexpected":     frames.Append(nil, &frames.Welcome{}),
		"too many items": {byte(frames.TypeRegister), 0, 0, 0, 2, 0xff, 0xff},
	}
	for name, junk := range garbage {
		t.Run(name, func(t *testing.T) {
			bad := e.EnrolledRaw(t, nil, "bad-"+strings.ReplaceAll(name, " ", "-"))
			bad.Ctrl.Write(junk)
			if got := bad.ClosedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeBadRequest {
				t.Fatalf("got %v", got)
			}
			if code, _ := e.Get(false, "web-good.localhost", "/"); code != 200 {
				t.Fatalf("good agent not served after %s: %d", name, code)
			}
			good.Send(t, &frames.Heartbeat{Seq: 1})
			if _, ok := good.Recv(t).(*frames.HeartbeatAck); !ok {
				t.Fatalf("good agent's heartbeat not answered after %s", name)
			}
		})
	}
	if n := e.Counter("tether_relay_protocol_errors_total", ""); n != float64(len(garbage)) {
		t.Fatalf("%v protocol errors counted, want %d", n, len(garbage))
	}
}
