// Package bootenv provisions a device from a tether.env file on its boot
// partition, once: it moves the enrollment token into the agent's state
// dir, keeps the other settings there for every later start, and removes
// the file (and so the secret) from the card.
//
// # The file
//
// tether.env holds KEY=VALUE lines: blank lines and lines starting with #
// are skipped, a value may be wrapped in matching single or double quotes
// (nothing is unescaped inside them), CRLF line ends and a UTF-8 byte order
// mark (an editor on Windows) are accepted. Keys are the agent's settings
// listed in Keys; anything else (an unknown or repeated key, a control
// character, a file over MaxSize) refuses the whole file, which then stays
// where it is.
//
// # What Consume does
//
// It finds the first tether.env in Config.BootDirs, writes the token to
// <state dir>/enroll-token and the other settings, plus
// TETHER_ENROLL_TOKEN_FILE, to <state dir>/provisioned.env (both 0600,
// written atomically, owned by the state dir's owner), records the file's
// SHA-256, then overwrites tether.env with its settings minus the secret
// and deletes it; when it cannot be deleted it is renamed tether.env.done;
// when the partition is read-only the file stays and the error says the
// token is still on the card. A file whose SHA-256 was consumed before is
// not consumed again.
package bootenv

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// Names of the files Consume reads and writes.
const (
	FileName        = "tether.env"      // on the boot partition
	DoneName        = "tether.env.done" // when it cannot be deleted
	TokenFile       = "enroll-token"    // in the state dir
	SettingsFile    = "provisioned.env" // in the state dir
	consumedFile    = "provisioned.sha256"
	TokenKey        = "TETHER_ENROLL_TOKEN"
	tokenFileKey    = "TETHER_ENROLL_TOKEN_FILE"
	MaxSize         = 8 << 10 // bytes of tether.env
	maxValue        = 2 << 10 // bytes of one value
	defaultBootDirs = "/boot/firmware,/boot"
)

// Keys are the settings tether.env may carry.
var Keys = []string{
	"TETHER_RELAY_URL", TokenKey, "TETHER_DEVICE_NAME", "TETHER_SERVICES",
	"TETHER_RELEASE_KEYS", "TETHER_HEARTBEAT_INTERVAL", "TETHER_LOG_LEVEL", "TETHER_LOG_FORMAT",
}

// DefaultBootDirs are where Raspberry Pi OS mounts the boot partition:
// /boot/firmware (since Bookworm), then /boot (before).
func DefaultBootDirs() []string { return strings.Split(defaultBootDirs, ",") }

// Setting is one KEY=VALUE line.
type Setting struct{ Key, Value string }

// Parse reads tether.env strictly (see the package doc).
func Parse(data []byte) ([]Setting, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%s is %d bytes; at most %d", FileName, len(data), MaxSize)
	}
	if !utf8.Valid(data) {
		return nil, fmt.Errorf("%s is not UTF-8 text", FileName)
	}
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	var out []Setting
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSuffix(line, "\r")
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		s, err := parseLine(trimmed)
		if err != nil {
			return nil, fmt.Errorf("%s line %d: %w", FileName, n+1, err)
		}
		if slices.ContainsFunc(out, func(o Setting) bool { return o.Key == s.Key }) {
			return nil, fmt.Errorf("%s line %d: %s is set twice", FileName, n+1, s.Key)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s sets nothing", FileName)
	}
	return out, nil
}

func parseLine(line string) (Setting, error) {
	key, value, ok := strings.Cut(line, "=")
	if !ok {
		return Setting{}, errors.New("want KEY=VALUE")
	}
	key = strings.TrimSpace(strings.TrimPrefix(key, "export "))
	if !slices.Contains(Keys, key) {
		return Setting{}, fmt.Errorf("unknown key %q (known: %s)", key, strings.Join(Keys, " "))
	}
	value = strings.TrimSpace(value)
	if len(value) >= 2 && (value[0] == '"' || value[0] == '\'') && value[len(value)-1] == value[0] {
		value = value[1 : len(value)-1]
	}
	if len(value) > maxValue {
		return Setting{}, fmt.Errorf("%s is longer than %d bytes", key, maxValue)
	}
	if strings.ContainsFunc(value, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '"' || r == '\'' }) {
		return Setting{}, fmt.Errorf("%s holds a quote or a control character", key)
	}
	return Setting{Key: key, Value: value}, nil
}

// Config configures Consume and Load.
type Config struct {
	// BootDirs are searched in order for tether.env. Nil means
	// DefaultBootDirs.
	BootDirs []string
	// StateDir is the agent's state dir; it is created (0700) if missing.
	// Required.
	StateDir string
	// Logger; nil discards.
	Logger *slog.Logger
	// Now stamps the note left in a scrubbed file. Nil means time.Now.
	Now func() time.Time
	// remove deletes the consumed file; nil means os.Remove (tests make
	// it fail as a read-only partition would).
	remove func(string) error
}

// Result says what Consume did.
type Result struct {
	// Path is the tether.env found; empty when there was none.
	Path string
	// Consumed is true when its settings were taken now.
	Consumed bool
	// Left is where the scrubbed file remains (tether.env or
	// tether.env.done); empty when it was deleted.
	Left string
}

// Consume takes the first tether.env in the boot dirs into the state dir
// (see the package doc). No file is not an error. An error after the
// settings were taken (the file could not be removed) comes with
// Result.Consumed true: the agent can start all the same.
func Consume(c Config) (Result, error) {
	if c.StateDir == "" {
		return Result{}, errors.New("bootenv: StateDir is required")
	}
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dirs := c.BootDirs
	if dirs == nil {
		dirs = DefaultBootDirs()
	}
	var res Result
	var data []byte
	for _, d := range dirs {
		p := filepath.Join(d, FileName)
		b, err := readRegular(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return Result{Path: p}, err
		}
		res.Path, data = p, b
		break
	}
	if res.Path == "" {
		return res, nil
	}
	settings, err := Parse(data)
	if err != nil {
		return res, fmt.Errorf("%s: %w (the file is left as it is)", res.Path, err)
	}
	sum := sha256.Sum256(data)
	digest := hex.EncodeToString(sum[:])
	if err := os.MkdirAll(c.StateDir, 0o700); err != nil {
		return res, fmt.Errorf("create state dir: %w", err)
	}
	owner := ownerOf(c.StateDir)
	prev, _ := os.ReadFile(filepath.Join(c.StateDir, consumedFile))
	if strings.TrimSpace(string(prev)) != digest {
		if err := c.take(settings, digest, owner); err != nil {
			return res, err
		}
		res.Consumed = true
		log.Info("provisioned from the boot partition", "file", res.Path, "settings", keysOf(settings), "state_dir", c.StateDir)
	}
	res.Left, err = c.scrub(res.Path, settings)
	if err != nil {
		return res, err
	}
	if res.Left != "" {
		log.Warn("the boot partition's tether.env could not be deleted; its secret was removed", "left", res.Left)
	}
	return res, nil
}

// readRegular reads a regular file (not a link, a FIFO or a directory) of
// at most MaxSize bytes (one more is read to tell).
func readRegular(p string) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link: refused", p)
		}
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return b, nil
}

// take writes the token and the settings into the state dir, then the
// digest that marks the file consumed.
func (c Config) take(settings []Setting, digest string, owner *owner) error {
	var env bytes.Buffer
	env.WriteString("# Written by tether-agent from the boot partition's tether.env; the agent\n# reads it at every start (settings in its environment win).\n")
	tokenPath := filepath.Join(c.StateDir, TokenFile)
	for _, s := range settings {
		if s.Key == TokenKey {
			if err := writeAtomic(tokenPath, []byte(s.Value+"\n"), owner); err != nil {
				return fmt.Errorf("save enrollment token: %w", err)
			}
			fmt.Fprintf(&env, "%s=%s\n", tokenFileKey, tokenPath)
			continue
		}
		fmt.Fprintf(&env, "%s=%s\n", s.Key, s.Value)
	}
	if err := writeAtomic(filepath.Join(c.StateDir, SettingsFile), env.Bytes(), owner); err != nil {
		return fmt.Errorf("save provisioned settings: %w", err)
	}
	if err := writeAtomic(filepath.Join(c.StateDir, consumedFile), []byte(digest+"\n"), owner); err != nil {
		return fmt.Errorf("record provisioning: %w", err)
	}
	return nil
}

// scrub overwrites the boot file without its secret, then deletes it, or
// renames it DoneName. It returns where the scrubbed file is left.
func (c Config) scrub(path string, settings []Setting) (string, error) {
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Consumed by tether-agent on %s; the enrollment token was moved to the device.\n", now().UTC().Format(time.RFC3339))
	for _, s := range settings {
		if s.Key != TokenKey {
			fmt.Fprintf(&b, "# %s=%s\n", s.Key, s.Value)
		}
	}
	overwriteErr := overwrite(path, b.Bytes())
	remove := os.Remove
	if c.remove != nil {
		remove = c.remove
	}
	removeErr := remove(path)
	if removeErr == nil {
		return "", nil
	}
	if overwriteErr != nil {
		return path, fmt.Errorf("%s could not be deleted (%v) nor overwritten (%v): it still holds the enrollment token; remove it from the card", path, removeErr, overwriteErr)
	}
	done := filepath.Join(filepath.Dir(path), DoneName)
	if err := os.Rename(path, done); err != nil {
		return path, nil // scrubbed in place; the digest stops a second use
	}
	return done, nil
}

// overwrite replaces the bytes of an existing file in place (no new
// file: the FAT blocks that held the token are the ones rewritten).
func overwrite(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err == nil && st.Size() > int64(len(data)) {
		data = append(data, bytes.Repeat([]byte{'\n'}, int(st.Size())-len(data))...)
	}
	if err == nil {
		_, err = f.WriteAt(data, 0)
	}
	if err == nil {
		err = f.Truncate(int64(len(data)))
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Load returns the settings Consume saved in stateDir (none: nil, nil).
func Load(stateDir string) ([]Setting, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, SettingsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read provisioned settings: %w", err)
	}
	var out []Setting
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s: bad line %q", SettingsFile, line)
		}
		out = append(out, Setting{Key: k, Value: v})
	}
	return out, sc.Err()
}

func keysOf(ss []Setting) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.Key
	}
	return out
}

// owner is the uid and gid files in the state dir get when this runs as
// root (systemd's ExecStartPre=+ runs it so, for the service user).
type owner struct{ uid, gid int }

func ownerOf(dir string) *owner {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || sys.Uid == 0 {
		return nil
	}
	return &owner{int(sys.Uid), int(sys.Gid)}
}

// writeAtomic writes a 0600 file by a synced temp file renamed over it.
func writeAtomic(path string, data []byte, o *owner) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return err
	}
	if o != nil {
		if err := tmp.Chown(o.uid, o.gid); err != nil {
			return err
		}
	}
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
