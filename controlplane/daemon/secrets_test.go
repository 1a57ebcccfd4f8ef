package daemon_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// TestSecretFilesArePrivate: the control plane (and a standalone relay,
// which embeds it) creates its admin token and cluster CA key 0600, and
// refuses to start on either when others may read it, naming the file and
// the chmod that fixes it.
func TestSecretFilesArePrivate(t *testing.T) {
	ns, err := natsembed.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	nc, err := ns.ConnectAs(natsperm.ControlPlane, "controlplane")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	dir := t.TempDir()
	files := []string{"admin-token", "ca-key.pem"}
	d, err := daemon.Start(t.Context(), nc, daemon.Config{DataDir: dir, ClaimWait: wait})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	for _, f := range files {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v %v, want 0600", f, fi.Mode().Perm(), err)
		}
	}
	for _, f := range files {
		path := filepath.Join(dir, f)
		for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
			os.Chmod(path, mode)
			d, err := daemon.Start(t.Context(), nc, daemon.Config{DataDir: dir, ClaimWait: wait})
			if err == nil {
				d.Close()
				t.Fatalf("started with %s mode %v", f, mode)
			}
			if !strings.Contains(err.Error(), "chmod 600 "+path) {
				t.Fatalf("%s mode %v: %v, want the file and chmod 600 named", f, mode, err)
			}
		}
		os.Chmod(path, 0o600)
	}
	d, err = daemon.Start(t.Context(), nc, daemon.Config{DataDir: dir, ClaimWait: wait})
	if err != nil {
		t.Fatalf("after chmod 600: %v", err)
	}
	d.Close()
}
