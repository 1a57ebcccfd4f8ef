package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/agent"
)

// TestDeviceKeyIsPrivate: the agent creates its key 0600 and refuses to
// run with a key others may read, naming it and the chmod that fixes it;
// after the chmod it runs.
func TestDeviceKeyIsPrivate(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "device.key")
	cfg := agent.Config{RelayURLs: []string{"wss://127.0.0.1:1"}, StateDir: dir, EnrollToken: "tth_x",
		Services: []agent.Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, HeartbeatInterval: time.Second}
	run := func() error {
		a, err := agent.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		// Enrollment cannot reach 127.0.0.1:1: Run retries until ctx ends,
		// after the key was made or read.
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		return a.Run(ctx)
	}
	if err := run(); err != nil && strings.Contains(err.Error(), "key") {
		t.Fatal(err)
	}
	fi, err := os.Stat(key)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("device.key mode %v %v, want 0600", fi.Mode().Perm(), err)
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
		os.Chmod(key, mode)
		err := run()
		if err == nil || !strings.Contains(err.Error(), "chmod 600 "+key) {
			t.Fatalf("device.key mode %v: %v, want a refusal naming it and chmod 600", mode, err)
		}
	}
	os.Chmod(key, 0o600)
	if err := run(); err != nil && strings.Contains(err.Error(), "key") {
		t.Fatalf("after chmod 600: %v", err)
	}
}
