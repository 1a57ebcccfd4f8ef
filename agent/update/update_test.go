package update

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// device is a binary directory and a state dir with "binary" v1 in place.
type device struct {
	bin, state string
}

func newDevice(t *testing.T) device {
	t.Helper()
	d := device{bin: filepath.Join(t.TempDir(), "tether-agent"), state: t.TempDir()}
	if err := os.WriteFile(d.bin, []byte("binary v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d device) updater(t *testing.T, version string, steps *[]string) *Updater {
	t.Helper()
	cfg := Config{Binary: d.bin, StateDir: d.state, Version: version, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))}
	if steps != nil {
		cfg.Hook = func(s string) { *steps = append(*steps, s) }
	}
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func newRelease(version, body string) Release {
	sum := sha256.Sum256([]byte(body))
	return Release{Version: version, Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:])}
}

func (d device) binary(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (d device) want(t *testing.T, bin, prev string) {
	t.Helper()
	if got := d.binary(t, d.bin); got != bin {
		t.Errorf("binary holds %q, want %q", got, bin)
	}
	if prev != "" {
		if got := d.binary(t, d.bin+".prev"); got != prev {
			t.Errorf(".prev holds %q, want %q", got, prev)
		}
	}
}

func (d device) phase(t *testing.T, u *Updater) State {
	t.Helper()
	s, err := u.State()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestApplySwapsAndKeepsPrevious(t *testing.T) {
	d := newDevice(t)
	var steps []string
	u := d.updater(t, "v1.0.0", &steps)
	if err := u.Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
		t.Fatal(err)
	}
	d.want(t, "binary v2", "binary v1")
	if !slices.Equal(steps, []string{StepWritten, StepLinked, StepPending, StepSwapped}) {
		t.Errorf("steps %v", steps)
	}
	if _, err := os.Stat(u.NewPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf(".new left behind: %v", err)
	}
	fi, err := os.Stat(d.bin)
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("binary mode %v, %v", fi.Mode(), err)
	}
	s := d.phase(t, u)
	if s.Phase != PhasePending || s.Version != "v2.0.0" || s.Previous != "v1.0.0" || s.starts() != 0 || s.Deadline.IsZero() {
		t.Errorf("state %+v", s)
	}
	// The new version starts and becomes healthy.
	u2 := d.updater(t, "v2.0.0", nil)
	if err := u2.Startup(); err != nil {
		t.Fatal(err)
	}
	if _, ok := u2.Pending(); !ok {
		t.Fatal("not pending for v2")
	}
	if err := u2.MarkHealthy(); err != nil {
		t.Fatal(err)
	}
	if v, st, _, ok := u2.Report(); !ok || v != "v2.0.0" || st != PhaseHealthy {
		t.Errorf("report %s %s %v", v, st, ok)
	}
	if err := u2.Reported(); err != nil {
		t.Fatal(err)
	}
	if _, _, _, ok := u2.Report(); ok {
		t.Error("reported twice")
	}
	if _, ok := u2.Pending(); ok {
		t.Error("still pending once healthy")
	}
}

func TestApplyRefusesBadBinary(t *testing.T) {
	for name, tc := range map[string]struct {
		body string
		rel  Release
	}{
		"hash":  {"binary v2", newRelease("v2.0.0", "binary v3")},
		"short": {"binary", newRelease("v2.0.0", "binary v2")},
		"long":  {"binary v2 and more", newRelease("v2.0.0", "binary v2")},
		"sum":   {"binary v2", Release{Version: "v2.0.0", Size: 9, SHA256: "zz"}},
	} {
		t.Run(name, func(t *testing.T) {
			d := newDevice(t)
			u := d.updater(t, "v1.0.0", nil)
			if err := u.Apply(strings.NewReader(tc.body), tc.rel); err == nil {
				t.Fatal("applied")
			}
			d.want(t, "binary v1", "")
			if s := d.phase(t, u); s.Phase != "" {
				t.Errorf("state %+v", s)
			}
			if _, err := os.Stat(u.NewPath()); !errors.Is(err, os.ErrNotExist) {
				t.Errorf(".new left behind: %v", err)
			}
		})
	}
}

// TestStartsRollBack: a new version that keeps restarting without being
// healthy is rolled back at the start after MaxStarts, in-process or by
// preflight, and the restored version reports it and refuses the release.
func TestStartsRollBack(t *testing.T) {
	for _, by := range []string{"startup", "preflight"} {
		t.Run(by, func(t *testing.T) {
			d := newDevice(t)
			if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
				t.Fatal(err)
			}
			u2 := d.updater(t, "v2.0.0", nil)
			for i := range 3 {
				if by == "preflight" {
					if err := Preflight(d.bin, d.state, 0, slog.New(slog.DiscardHandler)); err != nil {
						t.Fatal(err)
					}
				}
				if err := u2.Startup(); err != nil {
					t.Fatalf("start %d: %v", i+1, err)
				}
				d.want(t, "binary v2", "binary v1")
			}
			var err error
			if by == "preflight" {
				err = Preflight(d.bin, d.state, 0, slog.New(slog.DiscardHandler))
			} else {
				err = u2.Startup()
				if !errors.Is(err, ErrRestart) {
					t.Fatalf("4th start: %v, want ErrRestart", err)
				}
				err = nil
			}
			if err != nil {
				t.Fatal(err)
			}
			d.want(t, "binary v1", "binary v1")
			u1 := d.updater(t, "v1.0.0", nil)
			if err := u1.Startup(); err != nil {
				t.Fatal(err)
			}
			v, st, reason, ok := u1.Report()
			if !ok || v != "v2.0.0" || st != PhaseRolledBack || !strings.Contains(reason, "3 starts") {
				t.Errorf("report %s %s %q %v", v, st, reason, ok)
			}
			if _, refused := u1.Refuses("v2.0.0"); !refused {
				t.Error("v2.0.0 would be taken again")
			}
			if _, refused := u1.Refuses("v2.0.1"); refused {
				t.Error("v2.0.1 refused")
			}
		})
	}
}

// TestPreflightNothingPending: preflight with no update, or a healthy one,
// changes nothing.
func TestPreflightNothingPending(t *testing.T) {
	d := newDevice(t)
	for range 5 {
		if err := Preflight(d.bin, d.state, 0, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatal(err)
		}
	}
	d.want(t, "binary v1", "")
	if _, err := os.Stat(filepath.Join(d.state, stateFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state written: %v", err)
	}
	if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
		t.Fatal(err)
	}
	if err := d.updater(t, "v2.0.0", nil).MarkHealthy(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := Preflight(d.bin, d.state, 0, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatal(err)
		}
	}
	d.want(t, "binary v2", "binary v1")
}

// TestWatch: the watchdog records healthy when told in time, and rolls
// back at the deadline otherwise.
func TestWatch(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			d := newDevice(t)
			if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
				t.Fatal(err)
			}
			u2 := d.updater(t, "v2.0.0", nil)
			healthy := make(chan struct{})
			done := make(chan error)
			go func() { done <- u2.Watch(t.Context(), healthy) }()
			time.Sleep(time.Minute + 59*time.Second)
			close(healthy)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if s := d.phase(t, u2); s.Phase != PhaseHealthy {
				t.Errorf("phase %q", s.Phase)
			}
			d.want(t, "binary v2", "binary v1")
		})
	})
	t.Run("deadline", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			d := newDevice(t)
			if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
				t.Fatal(err)
			}
			var steps []string
			u2 := d.updater(t, "v2.0.0", &steps)
			done := make(chan error)
			start := time.Now()
			go func() { done <- u2.Watch(t.Context(), make(chan struct{})) }()
			synctest.Wait()
			select {
			case err := <-done:
				t.Fatalf("watch returned early: %v", err)
			default:
			}
			if err := <-done; !errors.Is(err, ErrRestart) {
				t.Fatalf("watch: %v, want ErrRestart", err)
			}
			if waited := time.Since(start); waited != 2*time.Minute {
				t.Errorf("rolled back after %v, want 2m", waited)
			}
			d.want(t, "binary v1", "binary v1")
			if !slices.Equal(steps, []string{StepRollback, StepRestored}) {
				t.Errorf("steps %v", steps)
			}
			s := d.phase(t, u2)
			if s.Phase != PhaseRolledBack || !s.Restored || !strings.Contains(s.Reason, "within 2m0s") {
				t.Errorf("state %+v", s)
			}
		})
	})
	t.Run("deadline passed before start", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			d := newDevice(t)
			if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2*time.Minute + time.Second)
			if err := d.updater(t, "v2.0.0", nil).Startup(); !errors.Is(err, ErrRestart) {
				t.Fatalf("startup: %v, want ErrRestart", err)
			}
			d.want(t, "binary v1", "binary v1")
		})
	})
}

// TestInterrupted: the states a power cut can leave are finished at the
// next start.
func TestInterrupted(t *testing.T) {
	t.Run("before the rename", func(t *testing.T) {
		d := newDevice(t)
		u := d.updater(t, "v1.0.0", nil)
		u.cfg.Hook = func(s string) {
			if s == StepPending {
				panic(s) // the power goes
			}
		}
		func() {
			defer func() { recover() }()
			u.Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2"))
		}()
		d.want(t, "binary v1", "binary v1")
		// preflight counts a start; the old binary then finds it never swapped.
		if err := Preflight(d.bin, d.state, 0, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatal(err)
		}
		u1 := d.updater(t, "v1.0.0", nil)
		if err := u1.Startup(); err != nil {
			t.Fatal(err)
		}
		if _, st, _, ok := u1.Report(); !ok || st != PhaseFailed {
			t.Errorf("report %s %v", st, ok)
		}
		if _, ok := u1.Pending(); ok {
			t.Error("pending")
		}
	})
	t.Run("rollback before the restore", func(t *testing.T) {
		d := newDevice(t)
		if err := d.updater(t, "v1.0.0", nil).Apply(strings.NewReader("binary v2"), newRelease("v2.0.0", "binary v2")); err != nil {
			t.Fatal(err)
		}
		u2 := d.updater(t, "v2.0.0", nil)
		u2.cfg.Hook = func(s string) {
			if s == StepRollback {
				panic(s)
			}
		}
		func() {
			defer func() { recover() }()
			u2.Rollback("test")
		}()
		d.want(t, "binary v2", "binary v1")
		// The bad version starts again and puts the previous one back.
		u2.cfg.Hook = nil
		if err := u2.Startup(); !errors.Is(err, ErrRestart) {
			t.Fatalf("startup: %v", err)
		}
		d.want(t, "binary v1", "binary v1")
	})
}

func TestResume(t *testing.T) {
	d := newDevice(t)
	u := d.updater(t, "v1.0.0", nil)
	rel := newRelease("v2.0.0", "binary v2")
	f, off, err := u.Resume(rel)
	if err != nil || off != 0 {
		t.Fatal(off, err)
	}
	io.WriteString(f, "bina")
	f.Close()
	f, off, err = u.Resume(rel)
	if err != nil || off != 4 {
		t.Fatal(off, err)
	}
	io.WriteString(f, "ry v2")
	f.Close()
	// Another release starts again.
	other := newRelease("v2.0.1", "binary v2.0.1")
	if f, off, err = u.Resume(other); err != nil || off != 0 {
		t.Fatal(off, err)
	}
	f.Close()
	if f, off, err = u.Resume(rel); err != nil || off != 0 {
		t.Fatal(off, err)
	}
	io.WriteString(f, "binary v2 and more")
	f.Close()
	// Longer than the release: started again.
	if f, off, err = u.Resume(rel); err != nil || off != 0 {
		t.Fatal(off, err)
	}
	io.WriteString(f, "binary v2")
	f.Close()
	if err := u.Swap(rel); err != nil {
		t.Fatal(err)
	}
	d.want(t, "binary v2", "binary v1")
	if !bytes.Equal([]byte(d.binary(t, d.bin)), []byte("binary v2")) {
		t.Fatal("not swapped")
	}
}

// TestLinkOrCopy: where a hard link is refused (here: across file
// systems) the file is copied, with its mode.
func TestLinkOrCopy(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, []byte("binary v1"), 0o751); err != nil {
		t.Fatal(err)
	}
	dstDir, err := os.MkdirTemp("/dev/shm", "linkorcopy")
	if err != nil {
		t.Skip("no /dev/shm")
	}
	t.Cleanup(func() { os.RemoveAll(dstDir) })
	if os.Link(src, filepath.Join(dstDir, "probe")) == nil {
		t.Skip("the temp dir and /dev/shm are one file system")
	}
	dst := filepath.Join(dstDir, "dst")
	if err := os.WriteFile(dst, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := linkOrCopy(src, dst); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dst)
	if b, _ := os.ReadFile(dst); string(b) != "binary v1" || err != nil || fi.Mode().Perm() != 0o751 {
		t.Fatalf("dst %q mode %v, %v", b, fi.Mode(), err)
	}
}

// TestFloor: the floor the agent keeps is the highest of the releases it
// ran; a rollback puts back the one before.
func TestFloor(t *testing.T) {
	d := newDevice(t)
	swap := func(from string, rel Release) {
		t.Helper()
		if err := d.updater(t, from, nil).Apply(strings.NewReader("binary "+rel.Version), rel); err != nil {
			t.Fatal(err)
		}
		if err := d.updater(t, rel.Version, nil).MarkHealthy(); err != nil {
			t.Fatal(err)
		}
	}
	r2 := newRelease("v2.0.0", "binary v2.0.0")
	r2.Floor = "v1.5.0"
	swap("v1.0.0", r2)
	if f := d.updater(t, "v2.0.0", nil).Floor(); f != "v1.5.0" {
		t.Fatalf("floor %q", f)
	}
	r3 := newRelease("v3.0.0", "binary v3.0.0") // no floor of its own
	swap("v2.0.0", r3)
	if f := d.updater(t, "v3.0.0", nil).Floor(); f != "v1.5.0" {
		t.Fatalf("floor %q after a release without one", f)
	}
	r4 := newRelease("v4.0.0", "binary v4.0.0")
	r4.Floor = "v3.5.0"
	if err := d.updater(t, "v3.0.0", nil).Apply(strings.NewReader("binary v4.0.0"), r4); err != nil {
		t.Fatal(err)
	}
	u4 := d.updater(t, "v4.0.0", nil)
	if f := u4.Floor(); f != "v3.5.0" {
		t.Fatalf("floor %q while v4 is pending", f)
	}
	if err := u4.Rollback("test"); !errors.Is(err, ErrRestart) {
		t.Fatal(err)
	}
	if f := d.updater(t, "v3.0.0", nil).Floor(); f != "v1.5.0" {
		t.Fatalf("floor %q after the rollback", f)
	}
}
