package main

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// TestMain runs main itself when asked to by TestSecondControlPlaneExits.
func TestMain(m *testing.M) {
	if os.Getenv("TETHER_TEST_RUN_MAIN") == "1" {
		os.Unsetenv("TETHER_TEST_RUN_MAIN")
		os.Args = os.Args[:1]
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestSecondControlPlaneExits: a control plane started on a NATS where
// another one serves exits 1, saying which one serves.
func TestSecondControlPlaneExits(t *testing.T) {
	ns, err := natsembed.StartConfig(natsembed.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	nc, err := ns.ConnectAs(natsperm.ControlPlane, "controlplane")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	active, err := daemon.Start(t.Context(), nc, daemon.Config{DataDir: t.TempDir(), ClaimWait: 50 * time.Millisecond, Host: "the-active-one"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { active.Close() })

	auth := ns.Auth(natsperm.ControlPlane)
	pwFile := t.TempDir() + "/nats-password"
	os.WriteFile(pwFile, []byte(auth.Password+"\n"), 0o600)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		"TETHER_TEST_RUN_MAIN=1",
		"TETHER_NATS_URL="+ns.ClientURL(),
		"TETHER_NATS_USER="+auth.User,
		"TETHER_NATS_PASSWORD_FILE="+pwFile,
		"TETHER_DATA_DIR="+t.TempDir(),
		"TETHER_ADMIN_ADDR=127.0.0.1:0",
		"TETHER_OPS_ADDR=127.0.0.1:0",
		"TETHER_CLAIM_WAIT=300ms",
		"TETHER_LOG_FORMAT=text",
	)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("second control plane: %v, want exit status 1\n%s", err, out)
	}
	for _, want := range []string{"another control plane is active", "the-active-one", active.Claim.Instance} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("output does not say %q:\n%s", want, out)
		}
	}
}
