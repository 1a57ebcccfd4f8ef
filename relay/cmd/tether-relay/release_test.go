package main_test

import (
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestReleaseContract runs the release flow with the binaries, as an
// operator and a device would: tetherctl makes a key and signs make
// cross's agents, a standalone relay started with the public key accepts
// the publish, and serves /install.sh (with its URL and the key), the
// manifest, its signature and the binary, which minisign verifies.
func TestReleaseContract(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin := harness.BuildT(t, "tether-relay", "tetherctl")
	keyDir, dist := t.TempDir(), t.TempDir()
	out := ctl(t, bin, nil, "release", "keygen", "--dir", keyDir)
	_, pub, _ := strings.Cut(out, "TETHER_RELEASE_KEYS=")
	pub = strings.TrimSpace(pub)
	agent := make([]byte, 1<<20)
	rand.Read(agent)
	copy(agent[4096:], "v1.4.0")
	if err := os.WriteFile(filepath.Join(dist, "tether-agent-linux-amd64"), agent, 0o755); err != nil {
		t.Fatal(err)
	}
	ctl(t, bin, nil, "release", "sign", "--key", filepath.Join(keyDir, "tether-release.key"), "--version", "v1.4.0", dist)

	data := t.TempDir()
	addr := map[string]string{"https": freeAddr(t), "http": freeAddr(t), "ops": freeAddr(t), "admin": freeAddr(t)}
	relay, err := harness.Start(harness.Cmd{Path: filepath.Join(bin, "tether-relay"), Env: []string{
		"TETHER_DATA_DIR=" + data, "TETHER_RELEASE_RATE=off", "TETHER_HTTPS_ADDR=" + addr["https"], "TETHER_HTTP_ADDR=" + addr["http"],
		"TETHER_OPS_ADDR=" + addr["ops"], "TETHER_ADMIN_ADDR=" + addr["admin"], "TETHER_TCP_HOST=127.0.0.1",
		"TETHER_TCP_PORTS=" + relaytest.FreePortRange(t, 2).String(), "TETHER_RELAY_ID=relay-1", "TETHER_LOG_FORMAT=json",
		"TETHER_RELEASE_KEYS=" + pub,
	}})
	if err != nil {
		t.Fatal(err)
	}
	harness.StopAtEnd(t, relay)
	waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200, relay)
	ctlEnv := []string{"TETHER_ADMIN_URL=http://" + addr["admin"], "TETHER_ADMIN_TOKEN_FILE=" + filepath.Join(data, "admin-token")}
	client := publicClient(t, filepath.Join(data, "ca.pem"), addr)

	if body := get(t, client, "https://localhost/install.sh", 404); !strings.Contains(body, "no agent release has been published") {
		t.Fatalf("install.sh before a release: %s", body)
	}
	if out := ctl(t, bin, ctlEnv, "release", "publish", dist); !strings.Contains(out, "published v1.4.0 (amd64)") {
		t.Fatalf("publish: %s", out)
	}
	var rels []controlplane.ReleaseInfo
	if err := json.Unmarshal([]byte(ctl(t, bin, ctlEnv, "releases", "--json")), &rels); err != nil || len(rels) != 1 || !rels[0].Complete {
		t.Fatalf("releases: %+v %v", rels, err)
	}

	// The relay asks the control plane at most every 10s for the latest
	// release; a miss was just cached.
	relaytest.Eventually(t, 15e9, func() error {
		if code, body := tryGet(client, "https://localhost/install.sh"); code != 200 {
			return &httpError{code, body}
		}
		return nil
	})
	script := get(t, client, "https://localhost/install.sh", 200)
	if !strings.Contains(script, "default_relay='https://localhost'") || !strings.Contains(script, pub) {
		t.Fatalf("install.sh lacks the relay URL or the key:\n%.600s", script)
	}
	manifest := get(t, client, "https://localhost/_tether/release/manifest.json", 200)
	sig := get(t, client, "https://localhost/_tether/release/manifest.json.minisig", 200)
	want, _ := os.ReadFile(filepath.Join(dist, "manifest.json"))
	if manifest != string(want) {
		t.Fatalf("served manifest differs:\n%s", manifest)
	}
	if got := get(t, client, "https://localhost/_tether/release/tether-agent-linux-amd64", 200); got != string(agent) {
		t.Fatal("served binary differs")
	}
	if _, err := exec.LookPath("minisign"); err != nil {
		t.Log("SKIPPED minisign -V of the served manifest: no minisign binary (make tools)")
	} else {
		dl := t.TempDir()
		os.WriteFile(filepath.Join(dl, "manifest.json"), []byte(manifest), 0o644)
		os.WriteFile(filepath.Join(dl, "manifest.json.minisig"), []byte(sig), 0o644)
		if out, err := exec.Command("minisign", "-Vm", filepath.Join(dl, "manifest.json"), "-P", pub).CombinedOutput(); err != nil {
			t.Fatalf("minisign -V of the served manifest: %v\n%s", err, out)
		}
	}

	if out := ctl(t, bin, ctlEnv, "rollout", "start", "v1.4.0", "--percent", "10"); !strings.Contains(out, "active, 10% of every device") {
		t.Fatalf("rollout start: %s", out)
	}
	if out := ctl(t, bin, ctlEnv, "rollout", "status"); !strings.Contains(out, "0 devices match") {
		t.Fatalf("rollout status: %s", out)
	}
}

type httpError struct {
	code int
	body string
}

func (e *httpError) Error() string { return e.body }
