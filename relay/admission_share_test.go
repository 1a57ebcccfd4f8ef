package relay_test

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// dialFrom opens an agent connection to e's relay from the loopback
// address src (a host of its own), with the upgrade bounded by ctx.
func dialFrom(ctx context.Context, e *relaytest.Env, src string) (*smux.Session, error) {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return wsmux.Dial(ctx, e.RelayURL()+frames.ConnectPath,
		wsmux.DialOptions{TLS: &tls.Config{RootCAs: e.CA.Pool()}, DialContext: d.DialContext})
}

// TestHandshakeShareSilentAttacker: one address opening as many silent
// agent connections as the relay has handshake slots (upgrades that never
// say hello, each held until the handshake deadline) holds only its share:
// its connections beyond it wait for one of its own slots, and past its
// part of the queue are refused with 429 at once, while an agent from
// another address is served promptly. Before, the attacker held every
// slot and the agent waited for the attacker's deadline.
func TestHandshakeShareSilentAttacker(t *testing.T) {
	const slots, share = 4, 2
	const deadline = 30 * time.Second // the attacker's hold, and the longest wait
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.MaxHandshakes, c.MaxHandshakesPerClient = slots, share
		c.HandshakeTimeout = deadline
	}})
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "victim")

	const attacker = "127.0.0.2"
	for i := range share { // its share: upgraded, then silent
		mux, err := dialFrom(t.Context(), e, attacker)
		if err != nil {
			t.Fatalf("attacker connection %d within its share: %v", i, err)
		}
		t.Cleanup(func() { mux.Close() })
	}
	// As many more as its part of the queue holds (half of 4×slots, more
	// than the relay's free slots): they wait for the attacker's own slots.
	const extra = 4 * slots / 2
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	t.Cleanup(cancel)
	upgraded := make(chan error, extra)
	for range extra {
		wg.Go(func() {
			mux, err := dialFrom(ctx, e, attacker)
			if err == nil {
				context.AfterFunc(ctx, func() { mux.Close() })
			}
			upgraded <- err
		})
	}
	relaytest.Eventually(t, 10*time.Second, func() error {
		if n := e.Relay.HandshakesAtGate(); n < share+extra {
			return fmt.Errorf("%d of the attacker's %d connections at the gate", n, share+extra)
		}
		return nil
	})
	// The agent from another host gets a slot at once and completes its
	// handshake, long before the attacker's deadline.
	start := time.Now()
	actx, acancel := context.WithTimeout(t.Context(), deadline/2)
	defer acancel()
	mux, err := dialFrom(actx, e, "127.0.0.3")
	if err != nil {
		t.Fatalf("an agent from another address while the attacker holds its share: %v", err)
	}
	ra := relaytest.NewRawAgent(t, mux)
	ra.Handshake(t, key)
	took := time.Since(start)
	t.Logf("FIGURE handshake slots: an agent from another address served in %v while one address held its share (%d of %d) with silent upgrades and %d more waited (before: it waited for the attacker's %v deadline)",
		took.Round(time.Millisecond), share, slots, extra, deadline)
	// One more from the attacker: its part of the queue is full.
	resp, err := clientFrom(e, attacker).Get("https://" + e.HTTPSAddr() + frames.ConnectPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("the attacker's connection past its part of the queue: %s, want 429", resp.Status)
	}
	if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || secs < 1 {
		t.Fatalf("Retry-After %q", resp.Header.Get("Retry-After"))
	}
	select {
	case err := <-upgraded:
		t.Fatalf("an attacker connection beyond its share was answered while its share was held: %v", err)
	default:
	}
	if got := e.Counter("tether_relay_handshakes_total", "client_busy"); got != 1 {
		t.Errorf("tether_relay_handshakes_total{result=client_busy} %v, want 1", got)
	}
}
