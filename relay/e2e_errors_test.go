package relay_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

func TestErrorPages(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close() // nothing listens here: the local service "refuses"
	ra := startAgent(t, e.AgentConfig("", "pi01", e.Token(1), httpSvc("web", web),
		agent.Service{Name: "api", Proto: "http", Addr: deadAddr}))
	ra.registered(t)

	cases := []struct {
		name, host string
		status     int
		says       []string
	}{
		{"unknown host", "nope.localhost", 404, []string{"nope.localhost"}},
		{"not under the domain", "example.org", 404, []string{"example.org"}},
		{"local service refusing", "api-pi01.localhost", 502, []string{"api", "pi01", "connection refused"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, body := e.Get(false, c.host, "/")
			if code != c.status {
				t.Fatalf("status %d, want %d: %s", code, c.status, body)
			}
			for _, s := range c.says {
				if !strings.Contains(body, s) {
					t.Errorf("page does not say %q: %s", s, body)
				}
			}
			if strings.Contains(body, deadAddr) {
				t.Errorf("page leaks the device's local address: %s", body)
			}
		})
	}

	// Device offline: stop the agent; its names stay leased.
	ra.stop(t)
	relaytest.Eventually(t, 10*time.Second, func() error {
		if code, body := e.Get(false, "web-pi01.localhost", "/"); code != 503 || !strings.Contains(body, "pi01 is offline") {
			return fmt.Errorf("offline page: %d %s", code, body)
		}
		return nil
	})
}

func TestEnrollmentRefusals(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	used := e.Token(1)
	startAgent(t, e.AgentConfig("", "pi01", used, httpSvc("web", web))).registered(t)

	expired, _, err := e.CP.Store.CreateToken(context.Background(), 1, time.Nanosecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ name, token, says string }{
		{"bad", "tth_notatoken", "not valid"},
		{"used up", used, "used up"},
		{"expired", expired, "expired"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ra := startAgent(t, e.AgentConfig("", "pi-"+strings.ReplaceAll(c.name, " ", ""), c.token, httpSvc("web", web)))
			err := ra.exited(t, 10*time.Second)
			var ee *agent.EnrollError
			if !errors.As(err, &ee) || ee.Status != 401 || !strings.Contains(ee.Message, c.says) {
				t.Fatalf("got %v, want a 401 saying %q", err, c.says)
			}
			if strings.Contains(err.Error(), c.token) {
				t.Fatalf("error echoes the token: %v", err)
			}
		})
	}
	// A name clash is a 409 with a clear message.
	ra := startAgent(t, e.AgentConfig("", "pi01", e.Token(1), httpSvc("web", web)))
	var ee *agent.EnrollError
	if err := ra.exited(t, 10*time.Second); !errors.As(err, &ee) || ee.Status != 409 || !strings.Contains(ee.Message, "taken") {
		t.Fatalf("name clash: %v", err)
	}
	// Without a token and without enrollment the agent stops at once.
	ra = startAgent(t, e.AgentConfig("", "pi09", "", httpSvc("web", web)))
	if err := ra.exited(t, 10*time.Second); !errors.Is(err, agent.ErrNotEnrolled) {
		t.Fatalf("no token: %v", err)
	}
}

func TestRevokeCutsOffWithinSeconds(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	cfg := e.AgentConfig("", "pi01", e.Token(1), httpSvc("web", web))
	ra := startAgent(t, cfg)
	ra.registered(t)
	if code, _ := e.Get(false, "web-pi01.localhost", "/"); code != 200 {
		t.Fatalf("before revoke: %d", code)
	}
	start := time.Now()
	revokeViaAdmin(t, e, "pi01") // as tetherctl revoke does
	err := ra.exited(t, 5*time.Second)
	if !errors.Is(err, agent.ErrRevoked) {
		t.Fatalf("agent ended with %v, want ErrRevoked", err)
	}
	t.Logf("agent cut off %v after revocation", time.Since(start))
	if code, _ := e.Get(false, "web-pi01.localhost", "/"); code == 200 {
		t.Fatal("revoked device still served")
	}
	// It cannot come back: a restart ends the same way.
	cfg.EnrollToken = ""
	ra2 := startAgent(t, cfg)
	if err := ra2.exited(t, 10*time.Second); !errors.Is(err, agent.ErrRevoked) {
		t.Fatalf("restarted revoked agent: %v", err)
	}
}

func revokeViaAdmin(t *testing.T, e *relaytest.Env, device string) {
	t.Helper()
	srv := httptest.NewServer(e.CP.Admin)
	defer srv.Close()
	req, _ := http.NewRequest("POST", srv.URL+"/v1/devices/"+device+"/revoke", nil)
	req.Header.Set("Authorization", "Bearer "+e.CP.AdminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("revoke: %s", resp.Status)
	}
}

func TestRestartsKeepIdentityAndNames(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	ssh := relaytest.LineService(t)
	state := t.TempDir()
	svcs := []agent.Service{httpSvc("web", web), {Name: "ssh", Proto: "tcp", Addr: ssh}}
	ra := startAgent(t, e.AgentConfig(state, "pi01", e.Token(1), svcs...))
	first := ra.registered(t)
	key1, _ := os.ReadFile(filepath.Join(state, "device.key"))
	if fi, err := os.Stat(filepath.Join(state, "device.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("device key mode: %v %v", fi.Mode(), err)
	}

	// Agent restart without the token: same key, same names.
	ra.stop(t)
	ra = startAgent(t, e.AgentConfig(state, "pi01", "", svcs...))
	if again := ra.registered(t); fmt.Sprint(again) != fmt.Sprint(first) {
		t.Fatalf("names changed across agent restart: %v then %v", first, again)
	}
	key2, _ := os.ReadFile(filepath.Join(state, "device.key"))
	if !bytes.Equal(key1, key2) {
		t.Fatal("device key changed")
	}

	// Relay restart (graceful, then a crash): the agent comes back by itself
	// with the same names.
	for _, restart := range []func(){e.StopRelay, e.KillRelay} {
		restart()
		e.StartRelay()
		if again := ra.registered(t); fmt.Sprint(again) != fmt.Sprint(first) {
			t.Fatalf("names changed across relay restart: %v then %v", first, again)
		}
		relaytest.Eventually(t, 10*time.Second, func() error {
			if code, body := e.Get(true, "web-pi01.localhost", "/"); code != 200 {
				return fmt.Errorf("after relay restart: %d %s", code, body)
			}
			return nil
		})
	}
}

// rawAgent speaks the protocol by hand, to test what a real agent never does.
type rawAgent struct {
	mux  *smux.Session
	ctrl *smux.Stream
	pub  [32]byte
	key  ed25519.PrivateKey
}

func dialRaw(t *testing.T, e *relaytest.Env) *rawAgent {
	t.Helper()
	mux, err := wsmux.Dial(t.Context(), e.RelayURL()+frames.ConnectPath, wsmux.DialOptions{TLS: &tls.Config{RootCAs: e.CA.Pool()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mux.Close() })
	ctrl, err := mux.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	return &rawAgent{mux: mux, ctrl: ctrl}
}

// enrolledRaw makes a key, enrolls it and returns a raw agent that has
// completed the handshake and registered svcs.
func enrolledRaw(t *testing.T, e *relaytest.Env, key ed25519.PrivateKey, name string, svcs ...frames.Service) *rawAgent {
	t.Helper()
	if key == nil {
		_, key, _ = ed25519.GenerateKey(nil)
		if _, err := e.CP.Store.Enroll(context.Background(), controlplane.EnrollRequest{Token: e.Token(1), PublicKey: key.Public().(ed25519.PublicKey), Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	ra := dialRaw(t, e)
	ra.key = key
	copy(ra.pub[:], key.Public().(ed25519.PublicKey))
	ra.send(t, &frames.Hello{PublicKey: ra.pub, AgentVersion: "raw", HeartbeatMillis: 1000})
	ch := ra.recv(t).(*frames.Challenge)
	auth := &frames.Auth{}
	copy(auth.Signature[:], ed25519.Sign(key, frames.AuthMessage(ch.Nonce, ra.pub, ch.RelayID)))
	ra.send(t, auth)
	if _, ok := ra.recv(t).(*frames.Welcome); !ok {
		t.Fatal("no welcome")
	}
	ra.send(t, &frames.Register{Services: svcs})
	if _, ok := ra.recv(t).(*frames.Leases); !ok {
		t.Fatal("no leases")
	}
	return ra
}

func (ra *rawAgent) send(t *testing.T, m frames.Message) {
	t.Helper()
	if err := frames.Write(ra.ctrl, m); err != nil {
		t.Fatal(err)
	}
}

func (ra *rawAgent) recv(t *testing.T) frames.Message {
	t.Helper()
	ra.ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := frames.Read(ra.ctrl, 0)
	if err != nil {
		t.Fatalf("read from relay: %v", err)
	}
	return m
}

// closedWith waits for the relay to end the session and returns its last frame.
func (ra *rawAgent) closedWith(t *testing.T, within time.Duration) *frames.Error {
	t.Helper()
	var last *frames.Error
	ra.ctrl.SetReadDeadline(time.Now().Add(within))
	for {
		m, err := frames.Read(ra.ctrl, 0)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("session still open after %v", within)
			}
			return last
		}
		if e, ok := m.(*frames.Error); ok {
			last = e
		}
	}
}

func TestNewestSessionWins(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	first := enrolledRaw(t, e, nil, "pi01")
	second := enrolledRaw(t, e, first.key, "pi01")
	if got := first.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeSuperseded {
		t.Fatalf("old session ended with %v, want superseded", got)
	}
	second.send(t, &frames.Heartbeat{Seq: 1})
	if ack, ok := second.recv(t).(*frames.HeartbeatAck); !ok || ack.Seq != 1 {
		t.Fatal("new session not served")
	}
}

func TestBadHandshakes(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	_, key, _ := ed25519.GenerateKey(nil)
	var pub [32]byte
	copy(pub[:], key.Public().(ed25519.PublicKey))

	t.Run("signature by another key", func(t *testing.T) {
		ra := dialRaw(t, e)
		ra.send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.recv(t).(*frames.Challenge)
		_, other, _ := ed25519.GenerateKey(nil)
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(other, frames.AuthMessage(ch.Nonce, pub, ch.RelayID)))
		ra.send(t, auth)
		if got := ra.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("valid signature, key not enrolled", func(t *testing.T) {
		ra := dialRaw(t, e)
		ra.send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.recv(t).(*frames.Challenge)
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(key, frames.AuthMessage(ch.Nonce, pub, ch.RelayID)))
		ra.send(t, auth)
		if got := ra.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized || !strings.Contains(got.Message, "not enrolled") {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("replayed signature", func(t *testing.T) {
		// A signature captured from one connection is useless on the next:
		// every connection gets a fresh nonce.
		ra := dialRaw(t, e)
		ra.send(t, &frames.Hello{PublicKey: pub, HeartbeatMillis: 1000})
		ch := ra.recv(t).(*frames.Challenge)
		old := [32]byte{1, 2, 3}
		auth := &frames.Auth{}
		copy(auth.Signature[:], ed25519.Sign(key, frames.AuthMessage(old, pub, ch.RelayID)))
		ra.send(t, auth)
		if got := ra.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeUnauthorized {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("no hello", func(t *testing.T) {
		ra := dialRaw(t, e)
		ra.send(t, &frames.Heartbeat{Seq: 1})
		if got := ra.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeBadRequest {
			t.Fatalf("got %v", got)
		}
	})
	t.Run("silent until the handshake deadline", func(t *testing.T) {
		ra := dialRaw(t, e)
		ra.closedWith(t, 15*time.Second)
	})
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
	web := webService(t)
	good := startAgent(t, e.AgentConfig("", "good", e.Token(1), httpSvc("web", web)))
	good.registered(t)
	garbage := map[string][]byte{
		"oversized":      {byte(frames.TypeHeartbeat), 0x7f, 0xff, 0xff, 0xff},
		"truncated":      {byte(frames.TypeHeartbeat), 0, 0, 0, 2, 1, 2},
		"unexpected":     frames.Append(nil, &frames.Welcome{}),
		"too many items": {byte(frames.TypeRegister), 0, 0, 0, 2, 0xff, 0xff},
	}
	for name, junk := range garbage {
		t.Run(name, func(t *testing.T) {
			bad := enrolledRaw(t, e, nil, "bad-"+strings.ReplaceAll(name, " ", "-"))
			bad.ctrl.Write(junk)
			if got := bad.closedWith(t, 5*time.Second); got == nil || got.Code != frames.CodeBadRequest {
				t.Fatalf("got %v", got)
			}
			if code, _ := e.Get(false, "web-good.localhost", "/"); code != 200 {
				t.Fatalf("good agent not served after %s: %d", name, code)
			}
		})
	}
}

func TestSilentAgentDeclaredDead(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	ra := enrolledRaw(t, e, nil, "quiet") // heartbeat 1s, then nothing
	start := time.Now()
	ra.closedWith(t, 10*time.Second)
	if d := time.Since(start); d < 2*time.Second {
		t.Fatalf("closed after %v, before three intervals", d)
	}
}

func TestStreamCap(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) { c.MaxStreamsPerSession = 2 }})
	hold := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(hold) }) }
	defer release()
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		<-hold
	}))
	defer slow.Close()
	defer release()
	startAgent(t, e.AgentConfig("", "pi01", e.Token(1), httpSvc("web", slow))).registered(t)
	var resps []*http.Response
	for range 2 {
		resp, err := e.Client().Get("http://web-pi01.localhost/")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%v %v", resp, err)
		}
		resps = append(resps, resp)
	}
	code, body := e.Get(false, "web-pi01.localhost", "/")
	if code != 503 || !strings.Contains(body, "too many") {
		t.Fatalf("third stream: %d %s", code, body)
	}
	release()
	for _, r := range resps {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
}
