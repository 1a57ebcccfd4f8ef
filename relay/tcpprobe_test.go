package relay_test

import (
	"crypto/ed25519"
	"fmt"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestBusyPortNeverLeased: a port of the range that another process holds
// on the relay's host is reported busy and leased to nobody: the device
// gets the next one, which the relay then holds.
func TestBusyPortNeverLeased(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{TCPPorts: 4})
	foreign, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(e.TCPPorts.First))))
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	relaytest.Eventually(t, 10*time.Second, func() error {
		for _, r := range e.CP.Service.Relays() {
			if slices.Contains(r.BusyPorts, e.TCPPorts.First) {
				return nil
			}
		}
		return fmt.Errorf("port %d not reported busy yet", e.TCPPorts.First)
	})
	ra := relaytest.DialRaw(t, e.RelayURL(), e.CA.Pool())
	_, key, _ := ed25519.GenerateKey(nil)
	e.Enroll(t, key, "pi01")
	ls := ra.Handshake(t, key, frames.Service{Name: "ssh", Proto: "tcp"})
	if got := ls.Leases[0].Port; got != e.TCPPorts.First+1 {
		t.Fatalf("leased port %d, want %d (%d is held by another process)", got, e.TCPPorts.First+1, e.TCPPorts.First)
	}
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(e.TCPPorts.First+1))))
	if err != nil {
		t.Fatalf("the relay does not hold the leased port: %v", err)
	}
	c.Close()
}
