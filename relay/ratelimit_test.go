package relay_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// lineLog is a log that keeps its lines to count them.
type lineLog struct{ harness.SyncBuffer }

// count returns how many lines say s.
func (l *lineLog) count(s string) int {
	n := 0
	for line := range strings.Lines(l.String()) {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

// clientFrom is an HTTPS client of the relay whose connections come from
// the loopback address src.
func clientFrom(e *relaytest.Env, src string) *http.Client {
	tr := e.Client().Transport.(*http.Transport).Clone()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	tr.DialContext = d.DialContext
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// enrollAttempt posts an enrollment with a guessed token and returns the
// status and Retry-After.
func enrollAttempt(t *testing.T, c *http.Client, url string, i int) (int, string) {
	return enrollWith(t, c, url, fmt.Sprintf("tth_guess%040d", i), i)
}

func enrollWith(t *testing.T, c *http.Client, url, token string, i int) (int, string) {
	t.Helper()
	pub, _, _ := ed25519.GenerateKey(nil)
	body, _ := json.Marshal(frames.EnrollRequest{Token: token,
		EnrollDevice: frames.EnrollDevice{PublicKey: pub, Name: fmt.Sprintf("guess%d", i)}})
	resp, err := c.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// TestEnrollBruteForce: one address guessing tokens gets 429 with
// Retry-After once its burst is spent, the log gets a bounded number of
// lines however many attempts there are, and another address still
// enrolls. The same run without a limit is the figure before.
func TestEnrollBruteForce(t *testing.T) {
	const attempts = 400
	for _, limited := range []bool{false, true} {
		name := map[bool]string{false: "before (no limit)", true: "after (default limit)"}[limited]
		t.Run(name, func(t *testing.T) {
			logs := &lineLog{}
			e := relaytest.Start(t, relaytest.Options{
				Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
				RelayConfig: func(c *relay.Config) {
					if !limited {
						c.EnrollLimit = relay.RateLimit{PerSecond: -1}
					}
				},
			})
			url := "https://" + e.HTTPSAddr() + frames.EnrollPath
			attacker := clientFrom(e, "127.0.0.1")
			codes := map[int]int{}
			first429, retryAfter := -1, ""
			start := time.Now()
			for i := range attempts {
				code, ra := enrollAttempt(t, attacker, url, i)
				codes[code]++
				if code == http.StatusTooManyRequests && first429 < 0 {
					first429, retryAfter = i, ra
				}
			}
			took := time.Since(start)
			lines := logs.count("enrollment refused") + logs.count("rate limit")
			reached := codes[http.StatusUnauthorized]
			t.Logf("FIGURE enroll brute force %s: %d attempts from one address in %v (%.0f/s): %d reached the control plane, %d got 429 (first at attempt %d, Retry-After %qs); %d log lines",
				name, attempts, took.Round(time.Millisecond), float64(attempts)/took.Seconds(), reached, codes[http.StatusTooManyRequests], first429, retryAfter, lines)
			if lines > 4 {
				t.Errorf("%d log lines for %d refused attempts: a flood", lines, attempts)
			}
			if !limited {
				if reached != attempts {
					t.Fatalf("without a limit: %v", codes)
				}
				return
			}
			burst := relay.DefaultEnrollLimit.Burst
			if first429 < burst || first429 > burst+5 || reached+codes[http.StatusTooManyRequests] != attempts {
				t.Fatalf("429 from attempt %d (burst %d): %v", first429, burst, codes)
			}
			if s, err := strconv.Atoi(retryAfter); err != nil || s < 1 || s > 5 {
				t.Fatalf("Retry-After %q", retryAfter)
			}
			if got := e.Counter("tether_relay_rate_limited_total", "enroll"); got != float64(codes[http.StatusTooManyRequests]) {
				t.Fatalf("metric %v, 429s %d", got, codes[http.StatusTooManyRequests])
			}
			// Another address is not affected: a device with a real token
			// enrolls from it, while the first is still refused.
			if code, _ := enrollWith(t, clientFrom(e, "127.0.0.2"), url, e.Token(1), 0); code != http.StatusOK {
				t.Fatalf("another address got %d, want 200", code)
			}
			// Its bucket refills at 1/s meanwhile (the other enrollment takes
			// its time under -race): of a few attempts at once, some are refused.
			refused := false
			for i := range 5 {
				if code, _ := enrollAttempt(t, attacker, url, 100000+i); code == http.StatusTooManyRequests {
					refused = true
					break
				}
			}
			if !refused {
				t.Fatal("the guessing address is no longer refused")
			}
		})
	}
}

// TestConnectRateLimit: past its burst, an address's upgrades on
// /_tether/connect are refused with 429 and Retry-After before any
// session starts; the default lets a fleet of 200 behind one address
// connect at once.
func TestConnectRateLimit(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.ConnectLimit = relay.RateLimit{PerSecond: 0.01, Burst: 3}
	}})
	for i := range 4 {
		mux, err := wsmux.Dial(t.Context(), e.RelayURL()+frames.ConnectPath, wsmux.DialOptions{TLS: &tls.Config{RootCAs: e.CA.Pool()}})
		var he *wsmux.HandshakeError
		switch {
		case i < 3 && err != nil:
			t.Fatalf("connection %d within the burst: %v", i, err)
		case i < 3:
			mux.Close()
		case !errors.As(err, &he) || he.Status != http.StatusTooManyRequests || !strings.Contains(he.Body, "retry in"):
			t.Fatalf("connection %d past the burst: %v, want 429", i, err)
		}
	}
	if got := e.Counter("tether_relay_rate_limited_total", "connect"); got != 1 {
		t.Fatalf("metric %v, want 1", got)
	}

	d := relaytest.Start(t, relaytest.Options{})
	var wg sync.WaitGroup
	var refused atomic.Int32
	for range 200 {
		wg.Go(func() {
			mux, err := wsmux.Dial(t.Context(), d.RelayURL()+frames.ConnectPath, wsmux.DialOptions{TLS: &tls.Config{RootCAs: d.CA.Pool()}})
			if err != nil {
				refused.Add(1)
				return
			}
			mux.Close()
		})
	}
	wg.Wait()
	if n := refused.Load(); n != 0 {
		t.Fatalf("%d of 200 connections from one address refused under the default limit", n)
	}
}

// TestFailedAgentAttemptsLogBounded: unknown keys and requests that are no
// WebSocket upgrade on /_tether/connect, as a scanner sends, are each
// counted but logged once per interval with their count, not per attempt
// (before: one INFO line each).
func TestFailedAgentAttemptsLogBounded(t *testing.T) {
	const n = 40
	logs := &lineLog{}
	e := relaytest.Start(t, relaytest.Options{Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	for range n {
		ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
		_, key, _ := ed25519.GenerateKey(nil)
		ra.Key = key
		copy(ra.Pub[:], key.Public().(ed25519.PublicKey))
		ra.Send(t, &frames.Hello{PublicKey: ra.Pub, HeartbeatMillis: 15000})
		if ch, ok := ra.Recv(t).(*frames.Challenge); ok {
			ra.Send(t, ra.Sign(ch.Nonce, ch.RelayID))
		}
		if fe := ra.ClosedWith(t, 10*time.Second); fe == nil || fe.Code != frames.CodeUnauthorized {
			t.Fatalf("an unknown key: %v, want unauthorized", fe)
		}
		resp, err := e.Client().Get("https://localhost" + frames.ConnectPath)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	failed, refused := logs.count("agent handshakes failed"), logs.count("agent upgrades refused")
	t.Logf("FIGURE %d unknown keys and %d plain GETs on %s: %d and %d log lines (before: %d and %d)", n, n, frames.ConnectPath, failed, refused, n, n)
	if failed < 1 || failed > 2 || refused < 1 || refused > 2 {
		t.Fatalf("%d handshake failure lines, %d upgrade refusal lines for %d of each", failed, refused, n)
	}
	if got := e.Counter("tether_relay_handshakes_total", "unauthorized"); got != n {
		t.Errorf("tether_relay_handshakes_total{result=unauthorized} %v, want %d", got, n)
	}
}
