package relay_test

import (
	"crypto/ed25519"
	"fmt"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestTCPLeaseHalfClose: a TCP lease passes the device's end of stream
// on to the public client as a half-close, so the client may still send
// (a service that says its piece and then listens), through the idle
// timeout's wrapping too.
func TestTCPLeaseHalfClose(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) { c.Public.TCPIdleTimeout = time.Minute }})
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "pi01")
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	ls := ra.Handshake(t, key, frames.Service{Name: "ssh", Proto: "tcp", IdleSeconds: 600})
	ra.KeepAlive(t)
	heard := make(chan string, 1)
	go func() {
		st, err := ra.Mux.AcceptStream()
		if err != nil {
			heard <- err.Error()
			return
		}
		defer st.Close()
		frames.ReadAs[*frames.StreamOpen](st, 4096)
		frames.Write(st, &frames.StreamAccept{})
		io.WriteString(st, "bye")
		st.CloseWrite()
		st.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(st)
		heard <- fmt.Sprintf("%s %v", b, err)
	}()
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(leasePort(t, ls, "ssh")))), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "bye" {
		t.Fatalf("from the device: %q %v", got, err)
	}
	io.WriteString(c, "after your EOF")
	c.(*net.TCPConn).CloseWrite()
	if h := <-heard; h != "after your EOF <nil>" {
		t.Fatalf("the device heard %q after its half-close, want the client's last bytes", h)
	}
}
