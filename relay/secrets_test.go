package relay_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/frames/secretfile"
	"github.com/tetherfleet/tether/relay"
)

// TestRelayKeysArePrivate: the relay's keys (peer, intermediate CA) are
// written 0600, also over files others could read; a kept key others can
// read is refused, with its name and the chmod that fixes it, rather than
// served from.
func TestRelayKeysArePrivate(t *testing.T) {
	cp := controlplanetest.Start(t, controlplanetest.Options{})
	dir := t.TempDir()
	keys := []string{"relay-peer-key.pem", "relay-ca-key.pem"}
	for _, k := range keys { // left world-readable by something before
		if err := os.WriteFile(filepath.Join(dir, k), []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(dir, k), 0o644)
	}
	cfg := relay.CertConfig{RelayID: "relay-a", DataDir: dir, ControlPlane: cp.Relay(0, "relay-a"), Public: true,
		Domain: "localhost", Hosts: []string{"127.0.0.1"}}
	if _, err := relay.LoadCerts(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if fi, err := os.Stat(filepath.Join(dir, k)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v %v, want 0600", k, fi.Mode().Perm(), err)
		}
	}
	for _, k := range keys {
		path := filepath.Join(dir, k)
		os.Chmod(path, 0o644)
		cfg := cfg
		cfg.ControlPlane = unreachable{}
		_, err := relay.LoadCerts(t.Context(), cfg)
		var ie *secretfile.InsecureError
		if !errors.As(err, &ie) || !strings.Contains(err.Error(), "chmod 600 "+path) {
			t.Fatalf("kept %s readable by others: %v, want a refusal naming it", k, err)
		}
		t.Logf("kept %s mode 0644: %v", k, err)
		os.Chmod(path, 0o600)
	}
}
