package secretfile_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/tetherfleet/tether/frames/secretfile"
)

// TestWriteIsPrivateOverAnOpenFile: writing over an existing
// world-readable file leaves a 0600 file (the old file's mode does not
// carry over), whatever the umask; nothing else is left in the directory.
func TestWriteIsPrivateOverAnOpenFile(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(path, []byte("old"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := secretfile.Write(path, []byte("tta_new\n")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v: want 0600", fi.Mode().Perm(), err)
	}
	if b, err := secretfile.Read(path); err != nil || string(b) != "tta_new\n" {
		t.Fatalf("read back %q %v", b, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want the file only", len(ents))
	}
}

// TestReadRefusesOthers: a secret file that group or others may access is
// refused with its path and the chmod that fixes it; ReadShared lets the
// group read (secret stores), not write, and never others.
func TestReadRefusesOthers(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		mode         os.FileMode
		strict, shrd bool // accepted by Read, by ReadShared
	}{
		{0o600, true, true}, {0o400, true, true}, {0o640, false, true}, {0o440, false, true},
		{0o660, false, false}, {0o604, false, false}, {0o644, false, false}, {0o666, false, false}, {0o601, false, false},
	} {
		path := filepath.Join(dir, "key-"+tc.mode.String())
		if err := os.WriteFile(path, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, tc.mode); err != nil {
			t.Fatal(err)
		}
		for _, r := range []struct {
			name string
			read func(string) ([]byte, error)
			ok   bool
		}{{"Read", secretfile.Read, tc.strict}, {"ReadShared", secretfile.ReadShared, tc.shrd}} {
			b, err := r.read(path)
			var ie *secretfile.InsecureError
			switch {
			case r.ok && (err != nil || string(b) != "secret"):
				t.Errorf("%s(%v): %q %v", r.name, tc.mode, b, err)
			case !r.ok && (!errors.As(err, &ie) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "chmod 600 "+path)):
				t.Errorf("%s(%v): %v, want a refusal naming the file and chmod 600", r.name, tc.mode, err)
			}
		}
	}
	if _, err := secretfile.Read(dir); err == nil {
		t.Error("a directory was read as a secret")
	}
	if _, err := secretfile.Read(filepath.Join(dir, "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v, want ErrNotExist", err)
	}
}
