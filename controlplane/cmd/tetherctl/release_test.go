package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

// fakeDist writes what make cross leaves in ./dist: agent binaries
// stamped with version, a relay binary and SHA256SUMS.
func fakeDist(t *testing.T, version string) string {
	t.Helper()
	dist := t.TempDir()
	for _, name := range []string{"tether-agent-linux-arm64", "tether-agent-linux-armv7", "tether-relay-linux-amd64"} {
		b := make([]byte, 200<<10)
		rand.Read(b)
		copy(b[1000:], "main.version="+version)
		if err := os.WriteFile(filepath.Join(dist, name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dist, "SHA256SUMS"), []byte("…\n"), 0o644)
	os.WriteFile(filepath.Join(dist, "tether-agent-linux-arm64.sha256"), []byte("…\n"), 0o644)
	os.Mkdir(filepath.Join(dist, "packages"), 0o755)
	return dist
}

func keygen(t *testing.T) (dir, pub string) {
	t.Helper()
	dir = t.TempDir()
	out, err := ctl(t, nil, "release", "keygen", "--dir", dir)
	if err != nil {
		t.Fatalf("keygen: %v\n%s", err, out)
	}
	fi, err := os.Stat(filepath.Join(dir, "tether-release.key"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key file: %v %v", fi, err)
	}
	_, line, ok := strings.Cut(out, "TETHER_RELEASE_KEYS=")
	if !ok {
		t.Fatalf("keygen does not print the public key:\n%s", out)
	}
	return dir, strings.TrimSpace(line)
}

func TestReleaseKeygenAndSign(t *testing.T) {
	keyDir, pub := keygen(t)
	if out, err := ctl(t, nil, "release", "keygen", "--dir", keyDir); err == nil || !strings.Contains(out+err.Error(), "exists") {
		t.Fatalf("keygen over an existing key: %v\n%s", err, out)
	}
	keys, err := release.ParseKeys([]string{pub})
	if err != nil {
		t.Fatal(err)
	}
	dist := fakeDist(t, "v1.4.0")
	key := filepath.Join(keyDir, "tether-release.key")
	out, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "v1.4.0", "--min-version", "v1.2.0", "--floor", "v1.3.0", dist)
	if err != nil {
		t.Fatalf("sign: %v\n%s", err, out)
	}
	manifest, _ := os.ReadFile(filepath.Join(dist, "manifest.json"))
	sig, _ := os.ReadFile(filepath.Join(dist, "manifest.json.minisig"))
	m, err := release.Verify(manifest, sig, keys)
	if err != nil {
		t.Fatalf("the signed manifest does not verify: %v", err)
	}
	if len(m.Artifacts) != 2 || m.Artifacts["arm64"].Size != 200<<10 || m.MinVersion != "v1.2.0" || m.Floor != "v1.3.0" {
		t.Fatalf("manifest: %s", manifest)
	}
	// minisign itself verifies it (make tools installs it).
	if _, err := exec.LookPath("minisign"); err != nil {
		t.Log("SKIPPED the minisign -V check: no minisign binary (apt-get install minisign, or make tools)")
	} else {
		out, err := exec.Command("minisign", "-V", "-m", filepath.Join(dist, "manifest.json"), "-P", pub).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "version:v1.4.0") {
			t.Fatalf("minisign -V: %v\n%s", err, out)
		}
		t.Logf("minisign -V: %s", bytes.TrimSpace(out))
	}
	// Binaries built without the version are refused.
	if out, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "v1.5.0", dist); err == nil || !strings.Contains(err.Error(), "make cross VERSION=v1.5.0") {
		t.Fatalf("sign binaries of another version: %v\n%s", err, out)
	}
	if out, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "v1.5.0", "--no-version-check", dist); err != nil {
		t.Fatalf("sign --no-version-check: %v\n%s", err, out)
	}
	if _, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "dev", "--no-version-check", dist); err == nil {
		t.Fatal("signed a release called dev")
	}
	if _, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "v1.4.0", t.TempDir()); err == nil {
		t.Fatal("signed an empty dist")
	}

	// A password-protected key (minisign -G's default) needs its password
	// (the key's KDF field says "Sc", scrypt; decrypting it is
	// minisign.DecryptKey's, too slow for a test: 1 GiB of scrypt).
	raw, _ := os.ReadFile(key)
	lines := strings.SplitN(string(raw), "\n", 2)
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(lines[1]))
	if err != nil {
		t.Fatal(err)
	}
	b[2], b[3] = 'S', 'c'
	encKey := filepath.Join(keyDir, "encrypted.key")
	os.WriteFile(encKey, []byte(lines[0]+"\n"+base64.StdEncoding.EncodeToString(b)+"\n"), 0o600)
	if out, err := ctl(t, nil, "release", "sign", "--key", encKey, "--version", "v1.4.0", dist); err == nil || !strings.Contains(err.Error(), "encrypted: give its password") {
		t.Fatalf("sign with an encrypted key and no password: %v\n%s", err, out)
	}
}

// controlPlane runs a real control plane trusting pub, its admin API on
// loopback, and ten lab devices running v1.3.0.
func controlPlane(t *testing.T, pub string) (*controlplanetest.Env, []string) {
	t.Helper()
	keys, err := release.ParseKeys([]string{pub})
	if err != nil {
		t.Fatal(err)
	}
	e := controlplanetest.Start(t, controlplanetest.Options{ReleaseKeys: keys})
	srv := httptest.NewServer(e.CP.Admin)
	t.Cleanup(srv.Close)
	ctx := context.Background()
	tok, _, _ := e.CP.Store.CreateToken(ctx, 10, time.Hour, map[string]string{"site": "lab"})
	for i := range 10 {
		pk, _, _ := ed25519.GenerateKey(nil)
		if _, err := e.CP.Store.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok),
			EnrollDevice: frames.EnrollDevice{PublicKey: pk, Name: fmt.Sprintf("pi%02d", i), AgentVersion: "v1.3.0"}}); err != nil {
			t.Fatal(err)
		}
	}
	return e, []string{"--admin-url", srv.URL, "--admin-token", e.CP.AdminToken}
}

func TestReleasePublishAndRollout(t *testing.T) {
	keyDir, pub := keygen(t)
	key := filepath.Join(keyDir, "tether-release.key")
	dist := fakeDist(t, "v1.4.0")
	if out, err := ctl(t, nil, "release", "sign", "--key", key, "--version", "v1.4.0", dist); err != nil {
		t.Fatalf("sign: %v\n%s", err, out)
	}
	e, flags := controlPlane(t, pub)

	out, err := ctl(t, flags, "release", "publish", dist)
	if err != nil || !strings.Contains(out, "published v1.4.0 (arm64 armv7)") || strings.Count(out, "uploaded") != 2 {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	if out, err := ctl(t, flags, "release", "publish", dist); err != nil || strings.Contains(out, "uploaded") {
		t.Fatalf("publish again (nothing to upload): %v\n%s", err, out)
	}
	stored, err := os.ReadFile(filepath.Join(e.DataDir, "releases", "v1.4.0", "tether-agent-linux-arm64"))
	want, _ := os.ReadFile(filepath.Join(dist, "tether-agent-linux-arm64"))
	if err != nil || !bytes.Equal(stored, want) {
		t.Fatalf("stored binary differs: %v", err)
	}
	out, err = ctl(t, flags, "releases")
	if err != nil || !strings.Contains(out, "v1.4.0") || !strings.Contains(out, "complete") {
		t.Fatalf("releases: %v\n%s", err, out)
	}

	out, err = ctl(t, flags, "rollout", "start", "v1.4.0", "--labels", "site=lab", "--percent", "10")
	if err != nil || !strings.Contains(out, "rollout of v1.4.0: active, 10% of site=lab") {
		t.Fatalf("rollout start: %v\n%s", err, out)
	}
	out, err = ctl(t, flags, "rollout", "status")
	if err != nil || !strings.Contains(out, "10 devices match, 1 chosen") || !strings.Contains(out, "pending 1") || !strings.Contains(out, "not-selected 9") {
		t.Fatalf("rollout status: %v\n%s", err, out)
	}
	if out, err = ctl(t, flags, "rollout", "set-percent", "50"); err != nil || !strings.Contains(out, "50%") {
		t.Fatalf("set-percent: %v\n%s", err, out)
	}
	if out, err = ctl(t, flags, "rollout", "start", "v1.4.0", "--labels", "site=lab", "--percent", "60"); err != nil || !strings.Contains(out, "60%") {
		t.Fatalf("start again with --percent: %v\n%s", err, out)
	}
	for _, action := range []string{"pause", "resume", "abort"} {
		out, err := ctl(t, flags, "rollout", action)
		want := map[string]string{"pause": "paused", "resume": "active", "abort": "aborted"}[action]
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("rollout %s: %v\n%s", action, err, out)
		}
	}
	out, err = ctl(t, flags, "rollout", "status", "--json")
	var st controlplane.RolloutStatus
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Rollout.State != controlplane.RolloutAborted || st.Chosen != 6 || len(st.Devices) != 10 {
		t.Fatalf("rollout status --json: %v\n%s", err, out)
	}
	if _, err := ctl(t, flags, "rollout", "start", "v9.9.9"); err == nil {
		t.Fatal("a rollout of an unpublished release started")
	}
}

func TestReleasePublishRefused(t *testing.T) {
	keyDir, pub := keygen(t)
	strangerDir, _ := keygen(t)
	_, flags := controlPlane(t, pub)

	dist := fakeDist(t, "v1.4.0")
	if out, err := ctl(t, nil, "release", "sign", "--key", filepath.Join(strangerDir, "tether-release.key"), "--version", "v1.4.0", dist); err != nil {
		t.Fatalf("sign: %v\n%s", err, out)
	}
	if out, err := ctl(t, flags, "release", "publish", dist); err == nil || !strings.Contains(err.Error(), "not signed by a trusted release key") {
		t.Fatalf("publish a stranger's release: %v\n%s", err, out)
	}

	dist = fakeDist(t, "v1.4.1")
	if out, err := ctl(t, nil, "release", "sign", "--key", filepath.Join(keyDir, "tether-release.key"), "--version", "v1.4.1", dist); err != nil {
		t.Fatalf("sign: %v\n%s", err, out)
	}
	// A binary changed after signing (same size).
	path := filepath.Join(dist, "tether-agent-linux-armv7")
	b, _ := os.ReadFile(path)
	b[0] ^= 1
	os.WriteFile(path, b, 0o755)
	out, err := ctl(t, flags, "release", "publish", dist)
	if err == nil || !strings.Contains(err.Error(), "SHA-256") {
		t.Fatalf("publish a tampered binary: %v\n%s", err, out)
	}
	if out, _ := ctl(t, flags, "releases"); !strings.Contains(out, "missing armv7") {
		t.Fatalf("releases after a refused binary:\n%s", out)
	}
}

func TestHelpListsReleaseCommands(t *testing.T) {
	out, _ := ctl(t, nil, "--help")
	for _, cmd := range []string{"release keygen", "release sign", "release publish", "releases", "rollout start", "rollout set-percent", "rollout status", "rollout pause|resume|abort"} {
		if !strings.Contains(out, cmd) {
			t.Errorf("--help lacks %q:\n%s", cmd, out)
		}
	}
	if _, err := ctl(t, nil, "release"); err == nil || !strings.Contains(err.Error(), "release keygen") {
		t.Errorf("release without a command: %v", err)
	}
}
