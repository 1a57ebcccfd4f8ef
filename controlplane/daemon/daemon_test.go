package daemon_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

const wait = 300 * time.Millisecond

func start(t *testing.T, nc *nats.Conn, host string) (*daemon.Daemon, string, error) {
	dir := t.TempDir()
	d, err := daemon.Start(t.Context(), nc, daemon.Config{DataDir: dir, ClaimWait: wait, Host: host})
	if err == nil {
		t.Cleanup(func() { d.Close() })
	}
	return d, dir, err
}

func claimError(t *testing.T, err error) *natsapi.ClaimError {
	t.Helper()
	var ce *natsapi.ClaimError
	if !errors.As(err, &ce) {
		t.Fatalf("got %v, want a *natsapi.ClaimError", err)
	}
	return ce
}

// noState: a control plane that may not serve wrote no store.
func noState(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "controlplane.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused control plane opened a store: %v", err)
	}
}

func TestOneControlPlaneAfterAnother(t *testing.T) {
	ns, err := natsembed.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	conn := func(name string) *nats.Conn {
		nc, err := ns.ConnectAs(natsperm.ControlPlane, name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	first, _, err := start(t, conn("controlplane 1"), "host-1")
	if err != nil {
		t.Fatal(err)
	}
	_, dir, err := start(t, conn("controlplane 2"), "host-2")
	ce := claimError(t, err)
	if !ce.Other.Active || ce.Other.Host != "host-1" || ce.Other.Instance != first.Claim.Instance {
		t.Fatalf("refusal names %+v, want the active host-1 %s", ce.Other, first.Claim.Instance)
	}
	for _, want := range []string{"active", "host-1", first.Claim.Instance} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("refusal %q does not say %q", err, want)
		}
	}
	noState(t, dir)
	// Once the first stops, another may serve.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := start(t, conn("controlplane 3"), "host-3"); err != nil {
		t.Fatalf("after the active one stopped: %v", err)
	}
}

// TestOneControlPlaneOfTwoStartingTogether, on one NATS server and on two
// servers of a cluster.
func TestOneControlPlaneOfTwoStartingTogether(t *testing.T) {
	t.Run("one server", func(t *testing.T) {
		ns, err := natsembed.Start()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ns.Shutdown)
		together(t, func(i int) *nats.Conn {
			nc, err := ns.ConnectAs(natsperm.ControlPlane, "controlplane")
			if err != nil {
				t.Fatal(err)
			}
			return nc
		})
	})
	t.Run("cluster", func(t *testing.T) {
		c, err := natsembed.StartCluster(3, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Shutdown)
		together(t, func(i int) *nats.Conn {
			nc, err := natsapi.Connect(c.Nodes[i].ClientURL(), c.Auth(natsperm.ControlPlane), natsperm.ControlPlane, "controlplane", nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := nc.FlushTimeout(5 * time.Second); err != nil {
				t.Fatal(err)
			}
			return nc
		})
	})
}

func together(t *testing.T, conn func(node int) *nats.Conn) {
	for round := range 3 {
		var wg sync.WaitGroup
		var daemons [2]*daemon.Daemon
		var dirs [2]string
		var errs [2]error
		conns := [2]*nats.Conn{conn(0), conn(1)}
		for i := range 2 {
			wg.Go(func() { daemons[i], dirs[i], errs[i] = start(t, conns[i], []string{"host-a", "host-b"}[i]) })
		}
		wg.Wait()
		served := 0
		for i := range 2 {
			if errs[i] == nil {
				served++
				continue
			}
			ce := claimError(t, errs[i])
			if other := daemons[1-i]; other == nil || ce.Other.Instance != other.Claim.Instance {
				t.Fatalf("round %d: refusal names %+v, not the one that serves", round, ce.Other)
			}
			noState(t, dirs[i])
		}
		if served != 1 {
			t.Fatalf("round %d: %d control planes serve (errors %v)", round, served, errs)
		}
		for i := range 2 {
			if daemons[i] != nil {
				daemons[i].Close()
			}
			conns[i].Close()
		}
	}
}

// TestClaimWaitsForNATS: with NATS not up, a control plane claims nothing
// (it would hear nobody); it says so when its context ends.
func TestClaimWaitsForNATS(t *testing.T) {
	nc, err := natsapi.Connect("nats://127.0.0.1:1", natsapi.Auth{}, natsperm.ControlPlane, "controlplane", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err = natsapi.Claim(ctx, nc, natsapi.ClaimConfig{Wait: wait})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("claim without NATS: %v", err)
	}
}
