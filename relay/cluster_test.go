package relay_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/replica"
)

// TestReplicaFollowsControlPlane: every relay learns a device's key,
// leases and presence from the control plane's events, whichever relay
// holds it, and keeps them in its bbolt file across a restart.
func TestReplicaFollowsControlPlane(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	b := e.AddRelay("relay-b")
	ra := e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"}, frames.Service{Name: "ssh", Proto: "tcp"})
	relaytest.Eventually(t, 10*time.Second, func() error {
		rec, lease, ok := b.Replica.ByHostname("web-pi01")
		if !ok || rec.Name != "pi01" || !lease.Online || lease.Relay != "relay-test" || lease.Service != "web" {
			return fmt.Errorf("relay-b's replica: %+v %+v %v", rec, lease, ok)
		}
		if _, l, ok := b.Replica.ByPort(e.TCPPorts.First); !ok || l.Service != "ssh" {
			return fmt.Errorf("port %d: %+v %v", e.TCPPorts.First, l, ok)
		}
		return nil
	})

	// Relay B restarts: its file still knows the device; the device
	// leaving meanwhile is caught up by the snapshot at start.
	b.Kill()
	ra.Mux.Close()
	relaytest.Eventually(t, 10*time.Second, func() error {
		if d, err := e.CP.Store.Device(context.Background(), "pi01"); err != nil || d.Online {
			return fmt.Errorf("control plane: %+v %v", d, err)
		}
		return nil
	})
	b.Start()
	rec, lease, ok := b.Replica.ByHostname("web-pi01")
	if !ok || rec.Name != "pi01" || lease.Online {
		t.Fatalf("after restart: %+v %+v %v, want pi01 offline", rec, lease, ok)
	}
	if n := b.Counter("tether_relay_replica_snapshots_total", ""); n < 1 {
		t.Fatalf("%v snapshots", n)
	}
}

// TestPublicNameLeasedIsAStartupError: a relay whose public name is a
// device's leased hostname refuses to start, naming both.
func TestPublicNameLeasedIsAStartupError(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	e.EnrolledRaw(t, nil, "pi01", frames.Service{Name: "web", Proto: "http"})
	nc, err := e.NATS.ConnectAs(natsperm.Relay, "relay relay-c")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	rep, err := replica.Open(replica.Config{Path: filepath.Join(t.TempDir(), "relay.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	rl, err := relay.New(relay.Config{RelayID: "relay-c", ControlPlane: &natsapi.Client{NC: nc}, Replica: rep, PublicNames: []string{"Web-Pi01.localhost."}})
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	err = rl.Start(t.Context())
	if err == nil || !strings.Contains(err.Error(), "web-pi01.localhost") || !strings.Contains(err.Error(), "pi01") {
		t.Fatalf("start: %v", err)
	}
}
