package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestClonedKeyStopsFlapping: two agents run with copies of one state dir
// (an SD card image copied to two boards). They take the device's session
// from each other until the control plane sees the pattern, flags the
// device and refuses further takeovers, so one keeps serving.
func TestClonedKeyStopsFlapping(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	web := webService(t)
	stateA := t.TempDir()
	cfg := agentConfig(e, stateA, "pi01", e.Token(1), httpSvc("web", web))
	startAgent(t, cfg).registered(t)

	stateB := t.TempDir()
	for _, f := range []string{"device.key", "device.json"} {
		b, err := os.ReadFile(filepath.Join(stateA, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(stateB, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfgB := cfg
	cfgB.StateDir, cfgB.EnrollToken = stateB, ""
	startAgent(t, cfgB)

	relaytest.Eventually(t, 30*time.Second, func() error {
		d, err := e.CP.Store.Device(context.Background(), "pi01")
		if err != nil {
			return err
		}
		if !d.CloneSuspected {
			return errors.New("clone not detected yet")
		}
		return nil
	})
	// The flapping has stopped: while the relay refuses the clone three more
	// times, the session (generation) stays put and the device is served.
	d1, _ := e.CP.Store.Device(context.Background(), "pi01")
	refused := e.Counter("tether_relay_handshakes_total", "conflict")
	relaytest.Eventually(t, 30*time.Second, func() error {
		if n := e.Counter("tether_relay_handshakes_total", "conflict"); n < refused+3 {
			return fmt.Errorf("%v refusals of the clone since detection", n-refused)
		}
		return nil
	})
	d2, _ := e.CP.Store.Device(context.Background(), "pi01")
	if d2.Generation != d1.Generation || !d2.Online {
		t.Fatalf("still flapping: generation %d then %d (online %v)", d1.Generation, d2.Generation, d2.Online)
	}
	if code, body := e.Get(false, "web-pi01.localhost", "/"); code != 200 {
		t.Fatalf("device not served: %d %s", code, body)
	}
}
