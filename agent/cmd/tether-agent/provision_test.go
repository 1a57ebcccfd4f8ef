package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestBootPartitionProvisioning is SD-card provisioning with the real
// binaries: tetherctl provision writes tether.env into a "boot" dir, the
// agent takes it at its first start, the secret leaves the card, the
// device enrolls and is served; the same file put back is not taken again.
func TestBootPartitionProvisioning(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	bin := harness.BuildT(t, "tether-agent", "tetherctl")
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello from a provisioned device")
	}))
	t.Cleanup(web.Close)
	dir := t.TempDir()
	boot, state, ca := filepath.Join(dir, "boot"), filepath.Join(dir, "state"), filepath.Join(dir, "ca.pem")
	os.Mkdir(boot, 0o755)
	if err := os.WriteFile(ca, e.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	token := e.Token(1)
	out, err := exec.CommandContext(t.Context(), filepath.Join(bin, "tetherctl"), "provision", "--token", token,
		"--relay", e.RelayURL(), "--services", "web=http://"+web.Listener.Addr().String(), "--name", "card01",
		"--boot", boot).CombinedOutput()
	if err != nil {
		t.Fatalf("tetherctl provision: %v\n%s", err, out)
	}
	card, err := os.ReadFile(filepath.Join(boot, "tether.env"))
	if err != nil || !bytes.Contains(card, []byte(token)) {
		t.Fatalf("tether.env: %v\n%s", err, card)
	}

	env := []string{"TETHER_BOOT_DIRS=" + boot, "TETHER_STATE_DIR=" + state, "TETHER_RELAY_CA=" + ca, "TETHER_LOG_FORMAT=text"}
	agent := harness.StartT(t, harness.Cmd{Path: filepath.Join(bin, "tether-agent"), Env: env})
	relaytest.Eventually(t, 30*time.Second, func() error {
		if agent.Exited() {
			t.Fatalf("the agent exited: %v\n%s", agent.Err(), agent.Logs())
		}
		_, err := os.Stat(filepath.Join(state, leasesFile))
		return err
	})
	e.AwaitPage(true, "web-card01."+e.Domain, "/", 200, "hello from a provisioned device", 10*time.Second)
	leases, _ := os.ReadFile(filepath.Join(state, leasesFile))
	if want := "web http web-card01." + e.Domain + "\n"; string(leases) != want {
		t.Errorf("leases file %q, want %q", leases, want)
	}

	// The secret left the card.
	if _, err := os.Stat(filepath.Join(boot, "tether.env")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("tether.env is still on the card: %v", err)
	}
	filepath.WalkDir(boot, func(p string, d fs.DirEntry, err error) error {
		if b, _ := os.ReadFile(p); err == nil && !d.IsDir() && bytes.Contains(b, []byte(token)) {
			t.Errorf("%s holds the token", p)
		}
		return nil
	})
	// Taken into the state dir (0600), used, then removed: a used token
	// left on the device would enroll another one.
	relaytest.Eventually(t, 10*time.Second, func() error {
		if _, err := os.Stat(filepath.Join(state, "enroll-token")); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("enroll-token still in the state dir: %v", err)
		}
		return nil
	})
	if err := agent.Stop(harness.StopGrace); err != nil {
		t.Log(err)
	}

	// The unit's ExecStartPre: nothing to take now; the same file put back
	// is removed but not taken again.
	provision := func() string {
		cmd := exec.CommandContext(t.Context(), filepath.Join(bin, "tether-agent"), "provision")
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("tether-agent provision: %v\n%s", err, out)
		}
		return string(out)
	}
	if out := provision(); !strings.Contains(out, "no tether.env in "+boot) {
		t.Errorf("provision with no file: %s", out)
	}
	if err := os.WriteFile(filepath.Join(boot, "tether.env"), card, 0o644); err != nil {
		t.Fatal(err)
	}
	if out := provision(); strings.Contains(out, "took the settings") {
		t.Errorf("the same file was taken twice: %s", out)
	}
	if _, err := os.Stat(filepath.Join(boot, "tether.env")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("tether.env put back is still on the card: %v", err)
	}
}

// TestSettingBeforeParse reads flags as cli.Parse does, before it runs.
func TestSettingBeforeParse(t *testing.T) {
	t.Setenv("TETHER_BOOT_DIRS", "/from/env")
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "/from/env"},
		{[]string{"--boot-dirs", "/a,/b"}, "/a,/b"},
		{[]string{"--insecure", "-boot-dirs=/c"}, "/c"},
		{[]string{"--boot-dirs"}, "true"},
		{[]string{"run", "--boot-dirs", "/d"}, "/from/env"}, // not a flag any more
	} {
		if got := setting(c.args, "boot-dirs", "TETHER_BOOT_DIRS"); got != c.want {
			t.Errorf("setting(%q) = %q, want %q", c.args, got, c.want)
		}
	}
}

// TestProvisionReadOnlyCard runs tether-agent provision on a boot dir
// mounted read-only (a private mount namespace, as root): the settings are
// taken once, and the error says the token is still on the card.
func TestProvisionReadOnlyCard(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and unshare for a read-only bind mount")
	}
	if out, err := exec.Command(unshare, "-m", "true").CombinedOutput(); err != nil {
		t.Skipf("unshare -m: %v %s", err, out)
	}
	bin := harness.BuildT(t, "tether-agent")
	dir := t.TempDir()
	boot, state := filepath.Join(dir, "boot"), filepath.Join(dir, "state")
	os.Mkdir(boot, 0o755)
	card := "TETHER_RELAY_URL=wss://relay.example.com\nTETHER_ENROLL_TOKEN=tth_readonly\nTETHER_SERVICES=web=http://127.0.0.1:80\n"
	if err := os.WriteFile(filepath.Join(boot, "tether.env"), []byte(card), 0o644); err != nil {
		t.Fatal(err)
	}
	provision := func() (string, error) {
		cmd := exec.CommandContext(t.Context(), unshare, "-m", "sh", "-c",
			`mount --bind -o ro "$1" "$1" && exec "$2" provision`, "sh", boot, filepath.Join(bin, "tether-agent"))
		cmd.Env = append(os.Environ(), "TETHER_BOOT_DIRS="+boot, "TETHER_STATE_DIR="+state, "TETHER_LOG_FORMAT=text")
		out, err := cmd.CombinedOutput()
		t.Logf("tether-agent provision (read-only card): %v\n%s", err, out)
		return string(out), err
	}
	out, err := provision()
	if err == nil || !strings.Contains(out, "still holds the enrollment token; remove it from the card") {
		t.Fatalf("no clear error: %v", err)
	}
	if tok, err := os.ReadFile(filepath.Join(state, "enroll-token")); err != nil || string(tok) != "tth_readonly\n" {
		t.Fatalf("token not taken: %q %v", tok, err)
	}
	if out, _ := provision(); strings.Contains(out, "provisioned from the boot partition") {
		t.Fatal("the read-only card was taken twice")
	}
	if b, _ := os.ReadFile(filepath.Join(boot, "tether.env")); string(b) != card {
		t.Fatalf("the read-only card changed:\n%s", b)
	}
}
