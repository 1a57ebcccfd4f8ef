// Package secretfile writes and reads the files that hold Tether's
// secrets: keys, tokens, passwords. A secret file is written whole with
// mode 0600 (a new temporary file, created exclusively with that mode,
// synced and renamed over the old one, so its mode never depends on a
// file that was there before), and a secret file that others may read is
// refused with the command that fixes it, rather than used.
//
// The agent links this package: it depends on the standard library only.
package secretfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// maxSize bounds what Read reads: secrets are small.
const maxSize = 1 << 20

// InsecureError is a secret file that someone other than its owner may
// access.
type InsecureError struct {
	Path string
	Mode fs.FileMode
}

func (e *InsecureError) Error() string {
	return fmt.Sprintf("secret file %s may be read by others (mode %v): refusing to use it; make it private with: chmod 600 %s (and check who read it)",
		e.Path, e.Mode.Perm(), e.Path)
}

// Write replaces path with data, mode 0600: a temporary file beside it
// (O_EXCL, 0600 from its creation), synced, renamed over path, and the
// directory synced.
func Write(path string, data []byte) error {
	dir := filepath.Dir(path)
	var f *os.File
	var err error
	for i := 0; i < 100; i++ {
		tmp := filepath.Join(dir, fmt.Sprintf(".%s.%d.%d.tmp", filepath.Base(path), os.Getpid(), i))
		f, err = os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("write secret %s: %w", path, err)
	}
	defer os.Remove(f.Name()) // a no-op once renamed
	// The umask only removes bits; Chmod makes 0600 exact whatever it is.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write secret %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Read returns the contents of the secret file path, refusing it
// (*InsecureError) when group or others have any access to it: what the
// binaries keep in their own data directories.
func Read(path string) ([]byte, error) { return read(path, 0o077) }

// ReadShared returns the contents of a secret file the operator provides
// (TETHER_*_FILE), refusing it (*InsecureError) when others (not its
// group) have any access or its group may write it: secret stores mount
// their files group-readable (Kubernetes with fsGroup).
func ReadShared(path string) ([]byte, error) { return read(path, 0o027) }

func read(path string, forbidden fs.FileMode) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat() // the file opened, not what the path names now
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("secret file %s is not a regular file (%v)", path, fi.Mode().Type())
	}
	if fi.Mode().Perm()&forbidden != 0 {
		return nil, &InsecureError{Path: path, Mode: fi.Mode()}
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxSize {
		return nil, fmt.Errorf("secret file %s is larger than %d bytes", path, maxSize)
	}
	return b, nil
}
