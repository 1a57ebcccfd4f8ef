package relay_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// shortLimits are public limits small enough for a test to see each one act.
func shortLimits(c *relay.Config) {
	c.Public = relay.PublicLimits{
		HeaderTimeout: time.Second, IdleTimeout: time.Second, BodyMinRate: 1024, BodyGrace: time.Second,
		ResponseHeaderTimeout: time.Second, StreamIdleTimeout: time.Second, TCPIdleTimeout: time.Second,
		MaxStreamsPerClient: 64,
	}
}

// from dials the relay's plain-HTTP listener from a loopback source
// address, so that tests can stand for several clients.
func from(t testing.TB, e *relaytest.Env, src string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", e.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// httpFrom is an HTTP client whose connections come from src.
func httpFrom(e *relaytest.Env, src string) *http.Client {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, e.HTTPAddr())
		},
	}}
}

// rssKB is the process's resident set, from /proc.
func rssKB(t testing.TB) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Skip("no VmRSS")
	return 0
}

// legitimateGets makes n GETs of url during an attack, each of which must
// answer 200, and returns their latencies, sorted.
func legitimateGets(t *testing.T, c *http.Client, url string, n int) []time.Duration {
	t.Helper()
	var lat []time.Duration
	for range n {
		start := time.Now()
		resp, err := c.Get(url)
		if err != nil {
			t.Fatalf("legitimate client during the attack: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("legitimate client during the attack: %s", resp.Status)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	return lat
}

// TestSlowClientsCannotHoldADevice: 500 public connections that stall (a
// header never finished, a body that stops, an idle keep-alive, an idle
// WebSocket), from ten addresses, do not keep a legitimate client from
// the device, and every one of them is closed by its timeout.
func TestSlowClientsCannotHoldADevice(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: shortLimits})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.KeepAlive(t) // the attack outlasts three heartbeat intervals
	var inFlight, peak atomic.Int64
	ra.ServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		if r.Header.Get("Upgrade") == "websocket" {
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			brw.Flush()
			io.Copy(io.Discard, c) // idle until the relay closes it
			return
		}
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}))
	const host = "web-pi01.localhost"
	rss0 := rssKB(t)

	const perKind = 125
	kinds := map[string]string{
		"header":    "GET / HTTP/1.1\r\nHost: " + host + "\r\nX-Slow: ",
		"body":      "POST / HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 1000000\r\n\r\n0123456789",
		"keepalive": "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"websocket": "GET /ws HTTP/1.1\r\nHost: " + host + "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
	}
	type slow struct {
		kind  string
		c     net.Conn
		since time.Time
	}
	var conns []slow
	i := 0
	for _, kind := range slices.Sorted(func(yield func(string) bool) {
		for k := range kinds {
			if !yield(k) {
				return
			}
		}
	}) {
		for range perKind {
			c := from(t, e, fmt.Sprintf("127.0.0.%d", 10+i%10)) // 50 per address: under the per-client cap
			i++
			if _, err := io.WriteString(c, kinds[kind]); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, slow{kind, c, time.Now()})
		}
	}
	// The answers the stalling clients wait for arrive (keep-alive: 200, websocket: 101).
	for _, s := range conns {
		if s.kind != "keepalive" && s.kind != "websocket" {
			continue
		}
		s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(s.c), nil)
		if err != nil || resp.StatusCode != map[string]int{"keepalive": 200, "websocket": 101}[s.kind] {
			t.Fatalf("%s connection: %v %v", s.kind, resp, err)
		}
		if s.kind == "keepalive" {
			io.Copy(io.Discard, resp.Body)
		}
	}
	rss1 := rssKB(t)

	// A legitimate client meanwhile.
	lat := legitimateGets(t, httpFrom(e, "127.0.0.9"), "http://"+host+"/", 100)

	// Every stalling connection is closed by the relay, none by our deadline.
	var wg sync.WaitGroup
	closedAfter := make([]time.Duration, len(conns))
	for i, s := range conns {
		wg.Go(func() {
			s.c.SetReadDeadline(time.Now().Add(15 * time.Second))
			_, err := io.Copy(io.Discard, s.c)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Errorf("%s connection %d still open 15s later", s.kind, i)
				return
			}
			closedAfter[i] = time.Since(s.since)
		})
	}
	wg.Wait()
	relaytest.Eventually(t, 5*time.Second, func() error {
		if n := inFlight.Load(); n != 0 {
			return fmt.Errorf("%d requests still open on the device", n)
		}
		return nil
	})
	worst := slices.Max(closedAfter)
	t.Logf("500 stalling connections (4 kinds × %d, 10 addresses): legitimate client p50 %v, p99 %v over %d requests; "+
		"all closed by the relay, the last %v after it opened; device saw at most %d requests at once; "+
		"test process RSS %d → %d kB (+%d kB per stalling connection, both ends)",
		perKind, lat[len(lat)/2], lat[len(lat)*99/100], len(lat), worst.Round(time.Millisecond), peak.Load(),
		rss0, rss1, (rss1-rss0)/len(conns))
	if per := (rss1 - rss0) / len(conns); per > 256 && !raceEnabled {
		t.Errorf("%d kB of RSS per stalling connection, want at most 256", per)
	}
}

// TestDeviceTooSlowIs504: a device that never answers gets the client a
// 504 after the response header timeout, not an endless wait.
func TestDeviceTooSlowIs504(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: shortLimits})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.ServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	start := time.Now()
	status, body := e.Get(false, "web-pi01.localhost", "/")
	if status != http.StatusGatewayTimeout || !strings.Contains(body, "did not answer") {
		t.Fatalf("%d %s", status, body)
	}
	t.Logf("504 after %v", time.Since(start).Round(time.Millisecond))
}

// TestPerClientCap: one client address cannot hold more than its share
// of a device's connections; another address is still served.
func TestPerClientCap(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.Public.MaxStreamsPerClient = 8
	}})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	release := make(chan struct{})
	var held atomic.Int64
	ra.ServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			held.Add(1)
			<-release
		}
		io.WriteString(w, "ok")
	}))
	hog := httpFrom(e, "127.0.0.30")
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(release)
	for range 8 {
		wg.Go(func() {
			if resp, err := hog.Get("http://web-pi01.localhost/hold"); err == nil {
				resp.Body.Close()
			}
		})
	}
	relaytest.Eventually(t, 10*time.Second, func() error {
		if n := held.Load(); n != 8 {
			return fmt.Errorf("%d requests held", n)
		}
		return nil
	})
	resp, err := hog.Get("http://web-pi01.localhost/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("X-Tether-Error") != "too_many_from_client" || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("ninth connection of one address: %s %v", resp.Status, resp.Header)
	}
	resp, err = httpFrom(e, "127.0.0.31").Get("http://web-pi01.localhost/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("another address: %s", resp.Status)
	}
}

// TestSlowReadersCannotStallTheSession: public clients that stop reading
// a large response (40 of them from two addresses, more than the
// session's window holds) are cut off by the response's minimum rate; a
// legitimate client meanwhile gets its answers, and the device's session
// (its heartbeats, at production's shortest interval) survives.
func TestSlowReadersCannotStallTheSession(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.Public.ResponseGrace, c.Public.ResponseMinRate = 500*time.Millisecond, 64<<10
		c.HeartbeatMin = 5 * time.Second // as in production: dead after 15s without a heartbeat
	}})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	ra.KeepAlive(t)
	big := bytes.Repeat([]byte("x"), 64<<20) // more than any socket buffers hold
	ra.ServeHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			w.Write(big)
			return
		}
		io.WriteString(w, "ok")
	}))
	const host = "web-pi01.localhost"
	var stalled []net.Conn
	for i := range 40 {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(fmt.Sprintf("127.0.0.%d", 50+i%2))},
			Control: func(_, _ string, c syscall.RawConn) error {
				return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
			}}
		c, err := d.Dial("tcp", e.HTTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		io.WriteString(c, "GET /big HTTP/1.1\r\nHost: "+host+"\r\n\r\n") // and never read
		stalled = append(stalled, c)
	}
	legit := httpFrom(e, "127.0.0.9")
	legit.Timeout = 30 * time.Second // the window is full until the cuts
	lat := legitimateGets(t, legit, "http://"+host+"/", 20)
	worst := lat[len(lat)-1]
	relaytest.Eventually(t, 20*time.Second, func() error {
		if n := e.Counter("tether_relay_http_errors_total", "slow_client"); n < float64(len(stalled)) {
			return fmt.Errorf("%v of %d stalled readers cut off", n, len(stalled))
		}
		return nil
	})
	for i, c := range stalled {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := io.Copy(io.Discard, c) // what the socket buffers held, then the relay's close
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() || n >= int64(len(big)) {
			t.Fatalf("stalled reader %d: %d bytes, %v: not cut off", i, n, err)
		}
	}
	if n := e.Counter("tether_relay_dead_sessions_total", ""); n != 0 {
		t.Fatalf("the device's session was declared dead %v times", n)
	}
	t.Logf("40 stalled readers of a 64 MiB response: all cut off; a legitimate client's slowest of 20 requests meanwhile took %v; the session lived", worst.Round(time.Millisecond))
}

// TestCanceledRequestsCannotFillTheSession: a client that cancels its
// requests before the device answers them (HTTP/2 rapid reset does it at
// thousands a second on one connection) used to leave the proxy's dials
// running (net/http finishes them for later requests), outside its
// per-client cap, until they filled the session's cap and everyone got 503
// "Device busy". A dial now ends with its request: the device's streams
// held for the client stay within its cap.
func TestCanceledRequestsCannotFillTheSession(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.MaxStreamsPerSession = 64
	}})
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"}, frames.Service{Name: "app", Proto: "http"})
	var pending, most atomic.Int64
	ra.ServeStreams(t, func(open *frames.StreamOpen, st *smux.Stream) {
		defer st.Close()
		if open.Service == "web" { // a device too slow to answer: it never does
			n := pending.Add(1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			io.Copy(io.Discard, st) // until the relay closes the stream
			pending.Add(-1)
			return
		}
		frames.Write(st, &frames.StreamAccept{})
		if _, err := http.ReadRequest(bufio.NewReader(st)); err == nil {
			io.WriteString(st, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
		}
	})
	attacker := httpFrom(e, "127.0.0.40")
	var attack sync.WaitGroup
	for range 8 {
		attack.Go(func() {
			for range 25 {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
				req, _ := http.NewRequestWithContext(ctx, "GET", "http://web-pi01.localhost/", nil)
				if resp, err := attacker.Do(req); err == nil {
					resp.Body.Close()
				}
				cancel()
			}
		})
	}
	attack.Wait()
	relaytest.Eventually(t, 10*time.Second, func() error { // the relay closed the dials of the gone requests
		if n := pending.Load(); n > 0 {
			return fmt.Errorf("%d dials still waiting on the device", n)
		}
		return nil
	})
	resp, err := httpFrom(e, "127.0.0.41").Get("http://app-pi01.localhost/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	t.Logf("200 canceled requests held at most %d streams to the device at once (session cap 64); another service answered %s", most.Load(), resp.Status)
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Errorf("another service of the device, from another address: %s %q; want 200", resp.Status, body)
	}
	// 8 requests at a time, each stream closed as its request goes (the
	// device may see the next before the last one's close): without the
	// fix, the session's cap (64).
	if n := most.Load(); n > 16 {
		t.Errorf("canceled requests of one client (8 at a time) held %d streams to the device at once; want at most 16", n)
	}
}
