package firmware_test

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

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/firmware"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/tetherfleet/tether/relay/releasecache"
)

// TestInstallFromRelay is the one-line install against a real relay
// serving a published release: `curl .../install.sh | sh -s -- --token`
// into a throwaway root, the installed agent (a real build) run with the
// written settings enrolls and is served, a second run prints the
// device's URLs, and a new release upgrades the binary in place and
// keeps the identity.
func TestInstallFromRelay(t *testing.T) {
	need(t, "curl")
	arch := hostArch(t)
	key := controlplanetest.NewReleaseKey(t)
	cacheDir := t.TempDir()
	e := relaytest.Start(t, relaytest.Options{ReleaseKeys: key.Keys, RelayConfig: func(c *relay.Config) {
		cache, err := releasecache.New(releasecache.Config{Upstream: c.ControlPlane.(controlplane.Releases), Dir: cacheDir, Keys: key.Keys})
		if err != nil {
			t.Fatal(err)
		}
		c.Releases = cache
	}})
	publish := func(version string, bin []byte) {
		t.Helper()
		manifest, sig := key.Sign(t, controlplanetest.Manifest(version, map[string][]byte{arch: bin}))
		if _, err := e.CP.Releases.Publish(t.Context(), manifest, sig); err != nil {
			t.Fatal(err)
		}
		if _, err := e.CP.Releases.PutArtifact(t.Context(), version, arch, bytes.NewReader(bin)); err != nil {
			t.Fatal(err)
		}
	}
	agentBin, err := os.ReadFile(filepath.Join(harness.BuildT(t, "tether-agent"), "tether-agent"))
	if err != nil {
		t.Fatal(err)
	}
	publish("v1.0.0", agentBin)

	dir := t.TempDir()
	root, ca := filepath.Join(dir, "root"), filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, e.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	base := "https://" + e.HTTPSAddr()
	run := func(root, args string) (string, error) {
		t.Helper()
		cmd := exec.CommandContext(t.Context(), "sh", "-c", "set -e; curl -fsS --cacert "+ca+" "+base+"/install.sh | sh -s -- "+args)
		cmd.Env = append(os.Environ(), "TETHER_INSTALL_ROOT="+root)
		out, err := cmd.CombinedOutput()
		t.Logf("install.sh %s:\n%s", args, out)
		return string(out), err
	}
	oneLiner := func(args string) string {
		t.Helper()
		out, err := run(root, args)
		if err != nil {
			t.Fatalf("install.sh: %v", err)
		}
		return out
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello from an installed device")
	}))
	t.Cleanup(web.Close)
	token := e.Token(1)
	out := oneLiner("--token " + token + " --services web=http://" + web.Listener.Addr().String() + " --name inst01 --relay-ca " + ca + " --wait 0")
	if !strings.Contains(out, "release manifest signature verified") || !strings.Contains(out, "binary sha256 matches the signed manifest") {
		t.Fatal("the script did not verify the release")
	}
	if b, _ := os.ReadFile(filepath.Join(root, firmware.BinaryPath)); !bytes.Equal(b, agentBin) {
		t.Fatal("the installed binary is not the release's")
	}

	// Run the installed agent with what the script wrote (paths moved into
	// the throwaway root), as the unit would.
	stateDir := filepath.Join(root, firmware.StateDir)
	env := []string{"TETHER_STATE_DIR=" + stateDir, "TETHER_BOOT_DIRS=" + filepath.Join(dir, "noboot"), "TETHER_LOG_FORMAT=text"}
	envFile, _ := os.ReadFile(filepath.Join(root, firmware.EnvFilePath))
	for line := range strings.SplitSeq(string(envFile), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasPrefix(v, "/") {
			v = filepath.Join(root, v)
		}
		env = append(env, k+"="+v)
	}
	agent := harness.StartT(t, harness.Cmd{Path: filepath.Join(root, firmware.BinaryPath), Env: env})
	relaytest.Eventually(t, 30*time.Second, func() error {
		if agent.Exited() {
			t.Fatalf("the agent exited: %v\n%s", agent.Err(), agent.Logs())
		}
		_, err := os.Stat(filepath.Join(stateDir, "leases"))
		return err
	})
	e.AwaitPage(true, "web-inst01."+e.Domain, "/", 200, "hello from an installed device", 10*time.Second)
	identity, err := os.ReadFile(filepath.Join(stateDir, "device.key"))
	if err != nil {
		t.Fatal(err)
	}
	// Enrolled and connected: the used token is no longer on the device.
	relaytest.Eventually(t, 10*time.Second, func() error {
		if _, err := os.Stat(filepath.Join(stateDir, "enroll-token")); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("enroll-token still there: %v", err)
		}
		return nil
	})
	if v, err := os.ReadFile(filepath.Join(stateDir, "version")); err != nil || len(v) == 0 {
		t.Errorf("the agent wrote no version file: %q %v", v, err) // a dev build here: "dev"
	}
	if err := agent.Stop(harness.StopGrace); err != nil {
		t.Log(err)
	}
	// A re-run writes agent.env without the token file, which is gone.
	envFile = []byte(strings.Replace(string(envFile), "TETHER_ENROLL_TOKEN_FILE="+firmware.TokenFilePath+"\n", "", 1))

	// Again: nothing to download, the URLs printed.
	_, port, _ := strings.Cut(e.HTTPSAddr(), ":")
	out = oneLiner("--wait 0")
	if !strings.Contains(out, "is installed already") || !strings.Contains(out, "web: https://web-inst01."+e.Domain+":"+port) {
		t.Fatal("a second run did not keep the binary or print the URL")
	}

	// A new release: upgraded in place, identity and settings kept.
	v2 := append(bytes.Clone(agentBin), "v1.1.0"...)
	publish("v1.1.0", v2)
	relaytest.Eventually(t, 10*time.Second, func() error {
		if code, body := e.Get(true, "localhost", "/_tether/release/manifest.json"); code != 200 || !strings.Contains(body, "v1.1.0") {
			return fmt.Errorf("manifest: %d %s", code, body)
		}
		return nil
	})
	out = oneLiner("--wait 0")
	if b, _ := os.ReadFile(filepath.Join(root, firmware.BinaryPath)); !bytes.Equal(b, v2) || !strings.Contains(out, "downloading tether-agent v1.1.0") {
		t.Fatal("not upgraded to v1.1.0")
	}
	if b, _ := os.ReadFile(filepath.Join(stateDir, "device.key")); !bytes.Equal(b, identity) {
		t.Fatal("the upgrade changed the identity")
	}
	if b, _ := os.ReadFile(filepath.Join(root, firmware.EnvFilePath)); !bytes.Equal(b, envFile) {
		t.Errorf("the upgrade changed agent.env:\n%s\nwas:\n%s", b, envFile)
	}

	// A relay whose disk was tampered with serves a binary that differs
	// from the signed manifest: the script refuses it.
	cached := filepath.Join(cacheDir, "v1.1.0", "tether-agent-linux-"+arch)
	b, err := os.ReadFile(cached)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(cached, b, 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other")
	out, err = run(other, "--token "+e.Token(1)+" --services web=http://127.0.0.1:1 --relay-ca "+ca+" --wait 0")
	if err == nil || !strings.Contains(out, "does not match the signed manifest's sha256: refusing to install it") {
		t.Fatalf("a tampered binary from the relay: %v", err)
	}
	if _, err := os.Stat(filepath.Join(other, firmware.BinaryPath)); err == nil {
		t.Fatal("the tampered binary was installed")
	}
}
