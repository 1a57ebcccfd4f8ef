package relay_test

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// echoStreams accepts every data stream the relay opens to ra and echoes
// its bytes, passing the public client's half-close on, until the test
// ends.
func echoStreams(t *testing.T, ra *relaytest.RawAgent) {
	ra.ServeStreams(t, func(_ *frames.StreamOpen, st *smux.Stream) {
		defer st.Close()
		if frames.Write(st, &frames.StreamAccept{}) != nil {
			return
		}
		io.Copy(st, st)
		st.CloseWrite()
		io.Copy(io.Discard, st)
	})
}

// leasePort is the port leased to a service in ls.
func leasePort(t *testing.T, ls *frames.Leases, service string) uint16 {
	t.Helper()
	for _, l := range ls.Leases {
		if l.Service == service && l.Port != 0 {
			return l.Port
		}
	}
	t.Fatalf("no port leased to %s in %+v", service, ls.Leases)
	return 0
}

// dialEcho connects to a TCP lease and checks that an echo comes back.
func dialEcho(t *testing.T, host string, port uint16) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(int(port))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := echo(c, "hello"); err != nil {
		t.Fatalf("port %d: %v", port, err)
	}
	return c
}

// echo writes msg on c and reads it back within 5s.
func echo(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// closedAfter waits (at most 10s) for the relay to close c, idle since
// it was last used, and returns how long that took.
func closedAfter(c net.Conn) (time.Duration, error) {
	start := time.Now()
	c.SetReadDeadline(start.Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return 0, errors.New("idle connection still open after 10s")
	}
	return time.Since(start), nil
}

// idleClosedBusyKept opens two connections to a TCP lease whose idle
// timeout is 1s, keeps one busy for 2.5s and checks that it stays up
// while the relay closes the other about 1s after its last byte.
func idleClosedBusyKept(t *testing.T, host string, port uint16) time.Duration {
	t.Helper()
	idle := dialEcho(t, host, port)
	active := dialEcho(t, host, port)
	var wg sync.WaitGroup
	var after time.Duration
	var err error
	wg.Go(func() { after, err = closedAfter(idle) })
	if err := busy(active, 2500*time.Millisecond); err != nil {
		t.Error(err)
	}
	wg.Wait()
	if err != nil || after < 800*time.Millisecond || after > 3*time.Second {
		t.Errorf("idle connection closed %v after its last byte (%v), want about 1s", after, err)
	}
	return after
}

// busy keeps c in use (an echo every 200ms) for d; it fails if the
// connection ends meanwhile.
func busy(c net.Conn, d time.Duration) error {
	for end := time.Now().Add(d); time.Now().Before(end); {
		if err := echo(c, "ping"); err != nil {
			return fmt.Errorf("busy connection cut: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // the pace of the traffic, not a wait for an event
	}
	return nil
}

// TestTCPIdleTimeoutPerService: a TCP service whose agent asked for an
// idle timeout (1s here) has its idle public connections closed after
// it, while a busy one stays up; a service that asked none keeps its
// idle connections (the relay sets no ceiling).
func TestTCPIdleTimeoutPerService(t *testing.T) {
	relay.SetTCPIdleFloor(t, time.Second)
	e := relaytest.Start(t, relaytest.Options{})
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "pi01")
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ls := ra.Handshake(t, key, frames.Service{Name: "ssh", Proto: "tcp", IdleSeconds: 1}, frames.Service{Name: "db", Proto: "tcp"})
	ra.KeepAlive(t)
	echoStreams(t, ra)
	ssh, db := leasePort(t, ls, "ssh"), leasePort(t, ls, "db")

	quiet := dialEcho(t, "127.0.0.1", db)
	after := idleClosedBusyKept(t, "127.0.0.1", ssh)
	if err := echo(quiet, "still here"); err != nil {
		t.Errorf("a service without an idle timeout lost its idle connection: %v", err)
	}
	if n := e.Counter("tether_relay_tcp_idle_closed_total", ""); n != 1 {
		t.Errorf("tcp_idle_closed_total = %v, want 1", n)
	}
	t.Logf("idle connection closed %v after its last byte; busy one up for 2.5s; a service without the option kept its idle one", after.Round(time.Millisecond))
}

// TestTCPIdleCeiling: the relay's TCPIdleTimeout caps what a service
// asks, even the most a hostile agent can put on the wire (2^32-1 s),
// and applies to services that ask nothing.
func TestTCPIdleCeiling(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) { c.Public.TCPIdleTimeout = time.Second }})
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "pi01")
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ls := ra.Handshake(t, key, frames.Service{Name: "ssh", Proto: "tcp", IdleSeconds: math.MaxUint32}, frames.Service{Name: "db", Proto: "tcp"})
	ra.KeepAlive(t)
	echoStreams(t, ra)
	for _, svc := range []string{"ssh", "db"} {
		c := dialEcho(t, "127.0.0.1", leasePort(t, ls, svc))
		if after, err := closedAfter(c); err != nil || after < 800*time.Millisecond || after > 3*time.Second {
			t.Errorf("%s: idle connection closed %v after its last byte (%v), want about 1s (the relay's ceiling)", svc, after, err)
		}
	}
}

// TestTCPIdleTimeoutForwarded: a public connection that reaches another
// relay of the cluster than the one holding the device is closed after
// the service's idle timeout too (by the holding relay, the one that
// knows it), and a busy one stays up.
func TestTCPIdleTimeoutForwarded(t *testing.T) {
	relay.SetTCPIdleFloor(t, time.Second)
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "pi01")
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ls := ra.Handshake(t, key, frames.Service{Name: "ssh", Proto: "tcp", IdleSeconds: 1})
	ra.KeepAlive(t)
	echoStreams(t, ra)
	port := leasePort(t, ls, "ssh")
	relaytest.Eventually(t, 10*time.Second, func() error {
		if _, l, ok := b.Replica.ByPort(port); !ok || !l.Online || l.Relay != "relay-test" {
			return fmt.Errorf("relay-b's replica: port %d %+v %v", port, l, ok)
		}
		return nil
	})

	idleClosedBusyKept(t, b.Host, port)
	if n := e.Counter("tether_relay_tcp_idle_closed_total", ""); n != 1 {
		t.Errorf("holding relay: tcp_idle_closed_total = %v, want 1", n)
	}
	if n := b.Counter("tether_relay_tcp_idle_closed_total", ""); n != 0 {
		t.Errorf("relay-b (no ceiling): tcp_idle_closed_total = %v, want 0", n)
	}
}
