package agent_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestDrainMovesAgentToAnotherRelay: two relays share NATS and the control
// plane; relay A drains (as on SIGTERM) and its agent moves to relay B, its
// next URL, because of the notice and within the window.
func TestDrainMovesAgentToAnotherRelay(t *testing.T) {
	const window = 5 * time.Second
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) { c.DrainWindow = window }})
	b := e.AddRelay("relay-b")
	web := webService(t)
	cfg := agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", web))
	cfg.RelayURLs = []string{e.RelayURL(), b.URL()}
	ra := startAgent(t, cfg)
	ra.registered(t)
	before, err := e.CP.Store.Device(context.Background(), "pi01")
	if err != nil || before.Relay != "relay-test" {
		t.Fatalf("first session: %+v %v", before, err)
	}

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*window)
	defer cancel()
	if err := e.Relay.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took >= window {
		t.Fatalf("relay A's drain took %v: the agent did not move on the notice", took)
	}
	ra.registered(t) // its session on relay B

	after, err := e.CP.Store.Device(context.Background(), "pi01")
	if err != nil || after.Relay != "relay-b" || !after.Online || after.Generation != before.Generation+1 {
		t.Fatalf("after the move: %+v (generation before: %d) %v", after, before.Generation, err)
	}
	relaytest.Eventually(t, 10*time.Second, func() error {
		if code, body := getVia(b.HTTPAddr, "web-pi01.localhost"); code != 200 {
			return fmt.Errorf("relay B: %d %s", code, body)
		}
		return nil
	})
}

// getVia sends GET http://host/ to the relay listening on addr.
func getVia(addr, host string) (int, string) {
	c := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, n, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, n, addr)
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + host + "/")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
