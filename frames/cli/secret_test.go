package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/frames/cli"
)

// TestSecretFileModes: a TETHER_*_FILE secret (enrollment token, admin
// token, NATS password) is read when only its owner and group may read it
// (secret stores mount files group-readable), and refused, naming the file
// and the chmod that fixes it, when others may read it or its group write it.
func TestSecretFileModes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "enroll-token")
	if err := os.WriteFile(path, []byte("tth_secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for mode, ok := range map[os.FileMode]bool{0o600: true, 0o400: true, 0o640: true, 0o440: true, 0o644: false, 0o604: false, 0o660: false} {
		os.Chmod(path, mode)
		got, err := cli.Secret("", path)
		if ok && (err != nil || got != "tth_secret") {
			t.Errorf("mode %v: %q %v", mode, got, err)
		}
		if !ok && (err == nil || !strings.Contains(err.Error(), "chmod 600 "+path)) {
			t.Errorf("mode %v: %q %v, want a refusal naming the file and chmod 600", mode, got, err)
		}
	}
	if got, err := cli.Secret("given", path); err != nil || got != "given" {
		t.Errorf("a value beats the file: %q %v", got, err)
	}
}
