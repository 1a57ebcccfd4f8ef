// Package update swaps the running agent's binary for a verified new one
// and puts the previous one back when the new one does not become healthy.
//
// It does no networking and trusts nobody's word: the caller hands it the
// size and SHA-256 that a signed manifest gave, and it checks the bytes.
//
// # The swap
//
// Next to the binary (os.Executable, symlinks resolved) live two more
// files: NAME.new, the download, and NAME.prev, the previous binary. Swap
// checks NAME.new, fsyncs it, hard-links NAME to NAME.prev, writes the
// pending state (<state dir>/update.json: new and previous version,
// deadline, starts), renames NAME.new over NAME and fsyncs the directory;
// the caller then re-executes NAME (Exec). Every step is a rename or a
// link, so at every instant NAME is a complete binary, the old or the new:
// a power cut anywhere leaves a device that boots.
//
// # Rollback
//
// The new version must be healthy (MarkHealthy: connected, first
// heartbeats acknowledged) before the deadline (Config.Deadline after the
// swap). Three things enforce it:
//
//   - Startup, early in every start of the agent: it counts the start and
//     rolls back past Config.MaxStarts starts or past the deadline;
//   - Watch, the in-process watchdog: it rolls back when the deadline
//     passes before MarkHealthy;
//   - Preflight, run by systemd from NAME.prev before every start
//     (ExecStartPre=-NAME.prev preflight): it counts starts too, so that a
//     new binary that dies before reaching main is rolled back all the same.
//
// A rollback writes the outcome first (rolled-back, the reason), then
// links NAME.prev to a temporary name and renames that over NAME. The
// restored agent reports the outcome on its next session (Report) and
// never takes that version again (Refuses).
package update

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/firmware/release"
)

// Phases of State.Phase.
const (
	PhasePending    = "pending"     // swapped; the new version has to prove healthy
	PhaseHealthy    = "healthy"     // the new version was healthy
	PhaseRolledBack = "rolled-back" // the new version failed; the previous one is back
	PhaseFailed     = "failed"      // the swap did not happen; nothing changed
)

// Steps of the swap and of a rollback, as Config.Hook is told them.
const (
	StepWritten    = "written"     // NAME.new is complete, checked and synced
	StepLinked     = "linked"      // NAME.prev is the running binary
	StepPending    = "pending"     // the pending state is on disk
	StepSwapped    = "swapped"     // NAME is the new binary
	StepRollback   = "rollback"    // the rolled-back outcome is on disk
	StepRestored   = "restored"    // NAME is the previous binary again
	stateFile      = "update.json" // in the state dir
	defaultStarts  = 3
	defaultTimeout = 2 * time.Minute
)

// ErrRestart is returned when the binary at Binary changed (a swap or a
// rollback) and the process must re-execute it (Exec).
var ErrRestart = errors.New("agent binary replaced: restart")

// Config configures an Updater.
type Config struct {
	// Binary is the agent binary's path. Empty means os.Executable with
	// symlinks resolved.
	Binary string
	// StateDir holds update.json. Required.
	StateDir string
	// Version is the running binary's version.
	Version string
	// Deadline is how long a new version has to become healthy after the
	// swap. Zero means 2m.
	Deadline time.Duration
	// MaxStarts is how many starts a new version gets to become healthy;
	// the next start rolls it back. Zero means 3.
	MaxStarts int
	// Hook, if set, is called after each step of a swap or rollback (the
	// Step* names): tests pause there to cut the power. Nil means none.
	Hook func(step string)
	// Logger; nil discards.
	Logger *slog.Logger
}

// Release is the new binary as its signed manifest describes it.
type Release struct {
	Version string
	Floor   string // the release's floor: no release below it (nor below an earlier one's) is taken once it runs
	Size    int64
	SHA256  string // hex
}

// State is update.json: the update in progress or the last one's
// outcome, and what the device will not take again.
type State struct {
	Phase    string    `json:"phase,omitempty"`    // a Phase* name; empty: no update yet
	Version  string    `json:"version,omitempty"`  // the release applied (or failed)
	Previous string    `json:"previous,omitempty"` // the version it replaced
	Deadline time.Time `json:"deadline,omitzero"`  // when a pending version is rolled back
	// Starts counts the pending version's starts seen in-process
	// (Startup); PreflightStarts those preflight saw. A start seen by both
	// counts once: the larger is the count.
	Starts          int    `json:"starts"`
	PreflightStarts int    `json:"preflight_starts"`
	Reason          string `json:"reason,omitempty"`     // why it rolled back or failed
	Restored        bool   `json:"restored,omitempty"`   // rolled back: NAME is the previous binary again
	Reported        bool   `json:"reported,omitempty"`   // the outcome reached a relay
	Floor           string `json:"floor,omitempty"`      // highest floor of the releases run, up to the one that runs
	PrevFloor       string `json:"prev_floor,omitempty"` // floor of the one it replaced
	// Download is the SHA-256 of the release NAME.new is being downloaded
	// for: a resumed download continues only the same file.
	Download string `json:"download,omitempty"`
	// RolledBack are versions that rolled back on this device: it never
	// takes them again.
	RolledBack []string `json:"rolled_back,omitempty"`
}

func (s State) starts() int { return max(s.Starts, s.PreflightStarts) }

// Updater swaps and rolls back one agent binary. Its methods are safe for
// concurrent use within one process.
type Updater struct {
	cfg Config
	bin string
	log *slog.Logger
	mu  sync.Mutex
}

// New checks cfg and returns an Updater.
func New(cfg Config) (*Updater, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("update: no state dir")
	}
	if cfg.Deadline <= 0 {
		cfg.Deadline = defaultTimeout
	}
	if cfg.MaxStarts <= 0 {
		cfg.MaxStarts = defaultStarts
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	bin := cfg.Binary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("update: find the agent binary: %w", err)
		}
		bin = exe
	}
	bin, err := filepath.EvalSymlinks(bin)
	if err != nil {
		return nil, fmt.Errorf("update: find the agent binary: %w", err)
	}
	return &Updater{cfg: cfg, bin: bin, log: cfg.Logger}, nil
}

// Binary is the agent binary's path.
func (u *Updater) Binary() string { return u.bin }

// NewPath is where the new binary is downloaded: NAME.new.
func (u *Updater) NewPath() string { return u.bin + ".new" }

// PrevPath is where the previous binary is kept: NAME.prev.
func (u *Updater) PrevPath() string { return u.bin + ".prev" }

func (u *Updater) step(s string) {
	if u.cfg.Hook != nil {
		u.cfg.Hook(s)
	}
}

// State reads update.json; a missing file is the zero State.
func (u *Updater) State() (State, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return readState(u.cfg.StateDir)
}

func readState(dir string) (State, error) {
	var s State
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("read update state: %w", err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("read update state %s: %w", filepath.Join(dir, stateFile), err)
	}
	return s, nil
}

// writeState replaces update.json atomically and durably.
func writeState(dir string, s State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, stateFile)
	if err := writeFileSync(path+".tmp", b, 0o600); err != nil {
		return fmt.Errorf("write update state: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("write update state: %w", err)
	}
	return syncDir(dir)
}

func writeFileSync(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	err = d.Sync()
	d.Close()
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Refuses reports whether version rolled back on this device before, and
// why it is then not taken again.
func (u *Updater) Refuses(version string) (string, bool) {
	s, err := u.State()
	if err != nil || !slices.Contains(s.RolledBack, version) {
		return "", false
	}
	return fmt.Sprintf("%s rolled back on this device before", version), true
}

// Floor is the floor of the release that runs ("" when unknown): the agent
// takes no release below it.
func (u *Updater) Floor() string {
	s, _ := u.State()
	if s.Phase == PhasePending || s.Phase == PhaseHealthy {
		return s.Floor
	}
	return s.PrevFloor
}

// Resume opens NAME.new to continue downloading rel: it returns the file,
// positioned at its end, and how many bytes it already holds. A file of
// another release, or longer than rel, is started again.
func (u *Updater) Resume(rel Release) (*os.File, int64, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, err := readState(u.cfg.StateDir)
	if err != nil {
		return nil, 0, err
	}
	flag := os.O_WRONLY | os.O_CREATE
	if s.Download != rel.SHA256 {
		flag |= os.O_TRUNC
		s.Download = rel.SHA256
		if err := writeState(u.cfg.StateDir, s); err != nil {
			return nil, 0, err
		}
	}
	f, err := os.OpenFile(u.NewPath(), flag, 0o755)
	if err != nil {
		return nil, 0, fmt.Errorf("open download: %w", err)
	}
	off, err := f.Seek(0, io.SeekEnd)
	if err == nil && off > rel.Size {
		err = f.Truncate(0)
		off = 0
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
	}
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("open download: %w", err)
	}
	return f, off, nil
}

// Discard removes a download that failed its checks, so the next one
// starts from the beginning.
func (u *Updater) Discard() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := os.Remove(u.NewPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	s, err := readState(u.cfg.StateDir)
	if err != nil || s.Download == "" {
		return err
	}
	s.Download = ""
	return writeState(u.cfg.StateDir, s)
}

// Apply writes the new binary from r to NAME.new and swaps it in (Swap).
func (u *Updater) Apply(r io.Reader, rel Release) error {
	f, err := os.OpenFile(u.NewPath(), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return fmt.Errorf("write new binary: %w", err)
	}
	_, err = io.Copy(f, io.LimitReader(r, rel.Size+1))
	if err = errors.Join(err, f.Close()); err != nil {
		return fmt.Errorf("write new binary: %w", err)
	}
	return u.Swap(rel)
}

// Swap checks NAME.new against rel (size, SHA-256) and swaps it in: see
// the package doc. On success the caller re-executes Binary (Exec). A
// NAME.new that fails its checks is removed.
func (u *Updater) Swap(rel Release) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := u.check(rel); err != nil {
		os.Remove(u.NewPath())
		return err
	}
	u.step(StepWritten)
	dir := filepath.Dir(u.bin)
	tmp := u.bin + ".prev.tmp"
	if err := linkOrCopy(u.bin, tmp); err != nil {
		return fmt.Errorf("keep the previous binary: %w", err)
	}
	if err := os.Rename(tmp, u.PrevPath()); err != nil {
		return fmt.Errorf("keep the previous binary: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	u.step(StepLinked)
	old, err := readState(u.cfg.StateDir)
	if err != nil {
		old = State{} // an unreadable state must not block updates; its list goes
	}
	s := State{Phase: PhasePending, Version: rel.Version, Previous: u.cfg.Version,
		Deadline: time.Now().Add(u.cfg.Deadline), Floor: higher(rel.Floor, old.currentFloor()), PrevFloor: old.currentFloor(),
		RolledBack: old.RolledBack}
	if err := writeState(u.cfg.StateDir, s); err != nil {
		return err
	}
	u.step(StepPending)
	if err := os.Rename(u.NewPath(), u.bin); err != nil {
		return fmt.Errorf("swap in the new binary: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	u.step(StepSwapped)
	u.log.Info("agent update applied; restarting into it", "version", rel.Version, "previous", u.cfg.Version, "deadline", u.cfg.Deadline)
	return nil
}

// higher returns the higher of two floors ("" is none; a floor that is
// not a release version counts as none).
func higher(a, b string) string {
	if c, err := release.Compare(a, b); err == nil && c < 0 || !release.IsRelease(a) {
		return b
	}
	return a
}

func (s State) currentFloor() string {
	if s.Phase == PhasePending || s.Phase == PhaseHealthy {
		return s.Floor
	}
	return s.PrevFloor
}

// check verifies NAME.new's size and SHA-256 and syncs it.
func (u *Updater) check(rel Release) error {
	want, err := hex.DecodeString(rel.SHA256)
	if err != nil || len(want) != sha256.Size {
		return fmt.Errorf("check new binary: bad sha256 %q in the manifest", rel.SHA256)
	}
	f, err := os.OpenFile(u.NewPath(), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("check new binary: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(f, rel.Size+1))
	if err != nil {
		return fmt.Errorf("check new binary: %w", err)
	}
	if n != rel.Size {
		return fmt.Errorf("check new binary: %d bytes, the manifest says %d", n, rel.Size)
	}
	if got := h.Sum(nil); !slices.Equal(got, want) {
		return fmt.Errorf("check new binary: sha256 %x, the manifest says %s", got, rel.SHA256)
	}
	if err := f.Chmod(0o755); err != nil {
		return fmt.Errorf("check new binary: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("check new binary: %w", err)
	}
	return nil
}

// Startup runs early in every start of the agent. With an update pending
// for this version it counts the start and rolls back (returning
// ErrRestart) past MaxStarts starts or the deadline. It also finishes a
// rollback or a swap that a power cut interrupted. Any other error is
// logged by the caller: the agent runs on.
func (u *Updater) Startup() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, err := readState(u.cfg.StateDir)
	if err != nil {
		return err
	}
	switch {
	case s.Phase == PhasePending && s.Version != u.cfg.Version:
		// The swap never happened: a power cut came before the rename.
		// The previous version runs.
		s.Phase, s.Reason, s.Reported = PhaseFailed, "interrupted before the new binary started", false
		return writeState(u.cfg.StateDir, s)
	case s.Phase == PhasePending:
		s.Starts++
		if reason := s.expired(u.cfg.MaxStarts); reason != "" {
			return u.rollback(s, reason)
		}
		return writeState(u.cfg.StateDir, s)
	case s.Phase == PhaseRolledBack && !s.Restored:
		if s.Version == u.cfg.Version {
			return u.restore(s) // the bad version runs: put the previous one back
		}
		s.Restored = true
		return writeState(u.cfg.StateDir, s)
	}
	return nil
}

// expired says why a pending update must roll back now, or "".
func (s State) expired(maxStarts int) string {
	if n := s.starts(); n > maxStarts {
		return fmt.Sprintf("not healthy after %d starts", maxStarts)
	}
	if !s.Deadline.IsZero() && time.Now().After(s.Deadline) {
		return "not healthy by the deadline " + s.Deadline.UTC().Format(time.RFC3339)
	}
	return ""
}

// Pending returns the deadline of an update waiting for this version to
// become healthy; ok is false when there is none.
func (u *Updater) Pending() (deadline time.Time, ok bool) {
	s, err := u.State()
	if err != nil || s.Phase != PhasePending || s.Version != u.cfg.Version {
		return time.Time{}, false
	}
	return s.Deadline, true
}

// Watch is the in-process watchdog. With an update pending for this
// version, it waits until healthy is closed, then records it
// (MarkHealthy) and returns nil; if the deadline comes first, it rolls
// back and returns ErrRestart. Without a pending update, or when ctx
// ends, it returns nil.
func (u *Updater) Watch(ctx context.Context, healthy <-chan struct{}) error {
	deadline, ok := u.Pending()
	if !ok {
		return nil
	}
	// A wall clock set backwards must not stretch the wait beyond one
	// deadline.
	t := time.NewTimer(min(time.Until(deadline), u.cfg.Deadline))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return nil
	case <-healthy:
		return u.MarkHealthy()
	case <-t.C:
		return u.Rollback(fmt.Sprintf("not healthy within %v of the swap (connected, first heartbeats acknowledged)", u.cfg.Deadline))
	}
}

// MarkHealthy records that the pending version is healthy: no rollback
// will happen.
func (u *Updater) MarkHealthy() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, err := readState(u.cfg.StateDir)
	if err != nil || s.Phase != PhasePending || s.Version != u.cfg.Version {
		return err
	}
	s.Phase, s.Reported, s.Download = PhaseHealthy, false, ""
	if err := writeState(u.cfg.StateDir, s); err != nil {
		return err
	}
	u.log.Info("agent update healthy", "version", s.Version, "previous", s.Previous)
	return nil
}

// Rollback puts the previous binary back because of reason and returns
// ErrRestart; the caller re-executes Binary.
func (u *Updater) Rollback(reason string) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, err := readState(u.cfg.StateDir)
	if err != nil {
		return err
	}
	if s.Phase != PhasePending {
		return fmt.Errorf("roll back: no update pending (%q)", s.Phase)
	}
	return u.rollback(s, reason)
}

func (u *Updater) rollback(s State, reason string) error {
	u.log.Error("agent update rolled back", "version", s.Version, "previous", s.Previous, "reason", reason)
	return rollback(u.bin, u.cfg.StateDir, s, reason, u.step)
}

func (u *Updater) restore(s State) error {
	if err := restore(u.bin, u.cfg.StateDir, s, u.step); err != nil {
		return err
	}
	return ErrRestart
}

// rollback records the outcome, then restores NAME.prev over NAME.
func rollback(bin, dir string, s State, reason string, step func(string)) error {
	s.Phase, s.Reason, s.Restored, s.Reported, s.Download = PhaseRolledBack, reason, false, false, ""
	if !slices.Contains(s.RolledBack, s.Version) {
		s.RolledBack = append(s.RolledBack, s.Version)
	}
	if err := writeState(dir, s); err != nil {
		return err
	}
	step(StepRollback)
	if err := restore(bin, dir, s, step); err != nil {
		return err
	}
	return ErrRestart
}

// restore links NAME.prev over NAME (keeping NAME.prev) and records it.
func restore(bin, dir string, s State, step func(string)) error {
	tmp := bin + ".rollback.tmp"
	if err := linkOrCopy(bin+".prev", tmp); err != nil {
		return fmt.Errorf("roll back: %w", err)
	}
	if err := os.Rename(tmp, bin); err != nil {
		return fmt.Errorf("roll back: %w", err)
	}
	if err := syncDir(filepath.Dir(bin)); err != nil {
		return err
	}
	step(StepRestored)
	s.Restored = true
	return writeState(dir, s)
}

// linkOrCopy makes dst (replaced if it exists) the same file as src: a
// hard link, or where the kernel refuses one (fs.protected_hardlinks and
// a binary owned by another user; a file system without links) a synced
// copy with src's mode.
func linkOrCopy(src, dst string) error {
	os.Remove(dst)
	if os.Link(src, dst) == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	return errors.Join(err, out.Close())
}

// Report returns the outcome of the last update that no relay has heard
// yet: state is healthy, rolled-back or failed; ok is false when there is
// nothing to report.
func (u *Updater) Report() (version, state, reason string, ok bool) {
	s, err := u.State()
	if err != nil || s.Reported {
		return "", "", "", false
	}
	switch s.Phase {
	case PhaseHealthy, PhaseRolledBack, PhaseFailed:
		return s.Version, s.Phase, s.Reason, true
	}
	return "", "", "", false
}

// Reported records that the outcome Report returned reached a relay.
func (u *Updater) Reported() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	s, err := readState(u.cfg.StateDir)
	if err != nil || s.Reported || s.Phase == PhasePending || s.Phase == "" {
		return err
	}
	s.Reported = true
	return writeState(u.cfg.StateDir, s)
}

// Preflight is the check systemd runs from NAME.prev before each start of
// the agent (bin is NAME): with an update pending, it counts the start and
// restores NAME.prev over NAME past maxStarts starts (zero means 3) or the
// deadline. It also finishes a rollback a power cut interrupted. It does
// nothing without a pending update, and never fails a start for a state it
// cannot read.
func Preflight(bin, stateDir string, maxStarts int, log *slog.Logger) error {
	if maxStarts <= 0 {
		maxStarts = defaultStarts
	}
	s, err := readState(stateDir)
	if err != nil {
		return err
	}
	noStep := func(string) {}
	switch {
	case s.Phase == PhasePending:
		s.PreflightStarts++
		if reason := s.expired(maxStarts); reason != "" {
			log.Error("agent update rolled back before start", "version", s.Version, "previous", s.Previous, "reason", reason)
			if err := rollback(bin, stateDir, s, reason, noStep); !errors.Is(err, ErrRestart) {
				return err
			}
			return nil
		}
		return writeState(stateDir, s)
	case s.Phase == PhaseRolledBack && !s.Restored:
		return restore(bin, stateDir, s, noStep)
	}
	return nil
}

// Exec re-executes the binary at path in place of this process, with the
// same arguments and environment. It returns only on failure.
func Exec(path string) error {
	return fmt.Errorf("re-execute %s: %w", path, syscall.Exec(path, os.Args, os.Environ()))
}
