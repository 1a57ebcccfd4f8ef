package agent_test

import (
	"bytes"
	"context"
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

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

func TestErrorPages(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close() // nothing listens here: the local service "refuses"
	ra := startAgent(t, agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", web),
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
	e.AwaitPage(false, "web-pi01.localhost", "/", 503, "pi01 is offline", 10*time.Second)
}

func TestEnrollmentRefusals(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	used := e.Token(1)
	startAgent(t, agentConfig(e, "", "pi01", used, httpSvc("web", web))).registered(t)

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
			ra := startAgent(t, agentConfig(e, "", "pi-"+strings.ReplaceAll(c.name, " ", ""), c.token, httpSvc("web", web)))
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
	ra := startAgent(t, agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", web)))
	var ee *agent.EnrollError
	if err := ra.exited(t, 10*time.Second); !errors.As(err, &ee) || ee.Status != 409 || !strings.Contains(ee.Message, "taken") {
		t.Fatalf("name clash: %v", err)
	}
	// Without a token and without enrollment the agent stops at once.
	ra = startAgent(t, agentConfig(e, "", "pi09", "", httpSvc("web", web)))
	if err := ra.exited(t, 10*time.Second); !errors.Is(err, agent.ErrNotEnrolled) {
		t.Fatalf("no token: %v", err)
	}
}

func TestRevokeCutsOffWithinSeconds(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	cfg := agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", web))
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
	ra := startAgent(t, agentConfig(e, state, "pi01", e.Token(1), svcs...))
	first := ra.registered(t)
	key1, _ := os.ReadFile(filepath.Join(state, "device.key"))
	if fi, err := os.Stat(filepath.Join(state, "device.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("device key mode: %v %v", fi.Mode(), err)
	}

	// Agent restart without the token: same key, same names.
	ra.stop(t)
	ra = startAgent(t, agentConfig(e, state, "pi01", "", svcs...))
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
		e.AwaitPage(true, "web-pi01.localhost", "/", 200, "", 10*time.Second)
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
	startAgent(t, agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", slow))).registered(t)
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
