package agent_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// The tests in the e2e_*_test.go files run the real agent against a real
// relay, control plane and NATS, all in-process on loopback
// (relaytest.Start). The relay's own tests speak the protocol by hand.

func TestMain(m *testing.M) { relaytest.RunWithLeakCheck(m) }

// agentConfig returns an agent config for e's relay; the state dir is new
// unless given.
func agentConfig(e *relaytest.Env, stateDir, name, token string, services ...agent.Service) agent.Config {
	if stateDir == "" {
		stateDir = e.T.TempDir()
	}
	return agent.Config{
		RelayURLs:         []string{e.RelayURL()},
		EnrollToken:       token,
		StateDir:          stateDir,
		DeviceName:        name,
		Services:          services,
		RootCAs:           e.CA.Pool(),
		HeartbeatInterval: time.Second,
		BackoffMax:        500 * time.Millisecond,
		Version:           "test",
		Logger:            e.Logger.With("component", "agent", "name", name),
	}
}

// runningAgent is an agent under test.
type runningAgent struct {
	leases chan []frames.Lease
	done   chan error
	cancel context.CancelFunc
}

// startAgent runs an agent until the test ends.
func startAgent(t *testing.T, cfg agent.Config) *runningAgent {
	t.Helper()
	ra := &runningAgent{leases: make(chan []frames.Lease, 16), done: make(chan error, 1)}
	cfg.OnLeases = func(ls []frames.Lease) { ra.leases <- ls }
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra.cancel = cancel
	go func() { ra.done <- a.Run(ctx) }()
	t.Cleanup(func() { ra.stop(t) })
	return ra
}

// registered waits for the agent's leases.
func (ra *runningAgent) registered(t *testing.T) []frames.Lease {
	t.Helper()
	select {
	case ls := <-ra.leases:
		return ls
	case err := <-ra.done:
		t.Fatalf("agent stopped before registering: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not register within 20s")
	}
	return nil
}

// exited waits for Run to return by itself.
func (ra *runningAgent) exited(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case err := <-ra.done:
		ra.done <- err
		return err
	case <-time.After(within):
		t.Fatalf("agent still running after %v", within)
	}
	return nil
}

func (ra *runningAgent) stop(t *testing.T) {
	ra.cancel()
	select {
	case err := <-ra.done:
		ra.done <- err
	case <-time.After(10 * time.Second):
		t.Error("agent did not stop within 10s")
	}
}

// webService is a device's local HTTP service that echoes what it sees.
func webService(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from device; host=%s xff=%s proto=%s xfh=%s path=%s",
			r.Host, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"), r.Header.Get("X-Forwarded-Host"), r.URL.Path)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func httpSvc(name string, srv *httptest.Server) agent.Service {
	return agent.Service{Name: name, Proto: "http", Addr: strings.TrimPrefix(srv.URL, "http://")}
}

func TestEndToEndHTTPAndTCP(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	ssh := relaytest.LineService(t)
	ra := startAgent(t, agentConfig(e, "", "pi01", e.Token(1),
		httpSvc("web", web), agent.Service{Name: "ssh", Proto: "tcp", Addr: ssh}))
	leases := ra.registered(t)
	if len(leases) != 2 || leases[0].Hostname != "web-pi01.localhost" || leases[1].Port != e.TCPPorts.First {
		t.Fatalf("leases %+v", leases)
	}

	code, body := e.Get(false, "web-pi01.localhost", "/x")
	if code != 200 || !strings.Contains(body, "host=web-pi01.localhost") || !strings.Contains(body, "xff=127.0.0.1") ||
		!strings.Contains(body, "proto=http ") || !strings.Contains(body, "path=/x") {
		t.Fatalf("http: %d %q", code, body)
	}
	code, body = e.Get(true, "web-pi01.localhost", "/y")
	if code != 200 || !strings.Contains(body, "proto=https") {
		t.Fatalf("https: %d %q", code, body)
	}

	// TCP: a line each way, then a half-close: the answer still arrives.
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", leases[1].Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "ping\n")
	r := bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || line != "PING\n" {
		t.Fatalf("tcp: %q %v", line, err)
	}
	c.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(r)
	if err != nil || string(rest) != "bye\n" {
		t.Fatalf("after half-close: %q %v", rest, err)
	}
}
