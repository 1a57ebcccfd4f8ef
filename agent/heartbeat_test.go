package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// pipeSession is an agent session over net.Pipe, for tests in a synctest
// bubble: the relay's end is driven by the test.
type pipeSession struct {
	c         *conn
	relayMux  *smux.Session
	relayCtrl *smux.Stream
}

func newPipeSession(t *testing.T, a *Agent) *pipeSession {
	t.Helper()
	agentEnd, relayEnd := net.Pipe()
	am, err := smux.Client(agentEnd, a.cfg.Mux.Smux())
	if err != nil {
		t.Fatal(err)
	}
	rm, err := smux.Server(relayEnd, a.cfg.Mux.Smux())
	if err != nil {
		t.Fatal(err)
	}
	ctrl, err := am.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	rctrl, err := rm.AcceptStream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { am.Close(); rm.Close() })
	return &pipeSession{c: &conn{a: a, relay: "pipe", mux: am, ctrl: ctrl}, relayMux: rm, relayCtrl: rctrl}
}

func newTestAgent(t *testing.T, heartbeat time.Duration) *Agent {
	t.Helper()
	a, err := New(Config{RelayURLs: []string{"wss://relay.test"}, StateDir: t.TempDir(),
		Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, HeartbeatInterval: heartbeat})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestSilentRelayIsDeadAfterThreeIntervals: the agent sends a heartbeat
// every interval and gives the relay up exactly three intervals after the
// last frame it heard.
func TestSilentRelayIsDeadAfterThreeIntervals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newTestAgent(t, 15*time.Second)
		p := newPipeSession(t, a)
		beats := make(chan time.Duration, 16)
		start := time.Now()
		go func() { // the relay reads heartbeats and never answers
			for {
				m, err := frames.Read(p.relayCtrl, 0)
				if err != nil {
					close(beats)
					return
				}
				if _, ok := m.(*frames.Heartbeat); ok {
					beats <- time.Since(start)
				}
			}
		}()
		err := p.c.serve(t.Context())
		if elapsed := time.Since(start); elapsed != 45*time.Second || err == nil || !strings.Contains(err.Error(), "declared dead") {
			t.Fatalf("serve returned %v after %v, want declared dead after 45s", err, elapsed)
		}
		p.c.close()
		var got []time.Duration
		for d := range beats {
			got = append(got, d)
		}
		// The third tick and the read deadline fall on the same instant:
		// its heartbeat may or may not go out before the session closes.
		if len(got) < 2 || len(got) > 3 || got[0] != 15*time.Second || got[1] != 30*time.Second || len(got) == 3 && got[2] != 45*time.Second {
			t.Fatalf("heartbeats at %v, want at 15s, 30s (and maybe 45s)", got)
		}
		a.wg.Wait()
	})
}

// TestAnsweredHeartbeatsKeepTheSession: a relay that answers keeps the
// session for as long as it does.
func TestAnsweredHeartbeatsKeepTheSession(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := newTestAgent(t, 15*time.Second)
		p := newPipeSession(t, a)
		go func() {
			for {
				m, err := frames.Read(p.relayCtrl, 0)
				if err != nil {
					return
				}
				if hb, ok := m.(*frames.Heartbeat); ok {
					frames.Write(p.relayCtrl, &frames.HeartbeatAck{Seq: hb.Seq})
				}
			}
		}()
		ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
		defer cancel()
		err := p.c.serve(ctx)
		if ctx.Err() == nil {
			t.Fatalf("serve ended before the hour was up: %v", err)
		}
		a.wg.Wait()
	})
}

// TestReconnectBackoff: an agent whose relay is unreachable retries for
// ever, each wait within the full-jitter bound and capped at BackoffMax.
func TestReconnectBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		id, err := loadOrCreateKey(filepath.Join(dir, keyFile))
		if err != nil {
			t.Fatal(err)
		}
		id.DeviceID, id.Name = frames.DeviceID(id.pub[:]), "dev"
		rec, _ := json.Marshal(id)
		if err := os.WriteFile(filepath.Join(dir, recordFile), rec, 0o600); err != nil {
			t.Fatal(err)
		}
		var dials []time.Time
		a, err := New(Config{RelayURLs: []string{"wss://relay.test"}, StateDir: dir,
			Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, BackoffMax: 30 * time.Second,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				dials = append(dials, time.Now())
				return nil, errors.New("network unreachable")
			}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute)
		defer cancel()
		if err := a.Run(ctx); err != nil {
			t.Fatalf("Run: %v", err)
		}
		if len(dials) < 60 {
			t.Fatalf("%d attempts in 30 minutes: the agent gave up or waited too long", len(dials))
		}
		var longest time.Duration
		for i := 1; i < len(dials); i++ {
			wait := dials[i].Sub(dials[i-1])
			ceil := min(30*time.Second, 500*time.Millisecond<<min(i-1, 30)) + time.Millisecond
			if wait <= 0 || wait > ceil {
				t.Fatalf("wait %d was %v, outside (0, %v]", i, wait, ceil)
			}
			longest = max(longest, wait)
		}
		if longest < 10*time.Second {
			t.Fatalf("longest wait %v: the backoff never grew towards its cap", longest)
		}
	})
}
