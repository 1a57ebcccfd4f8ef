// Package rollout is the control plane's side of agent releases: it
// accepts a release only when its manifest verifies against the release
// keys it trusts, keeps the release's binaries as files (each written
// atomically and checked against the manifest), runs the one current
// staged rollout, plans which devices are offered a release, and tells
// where each device is.
//
// Which devices a rollout reaches is release.Choose over the devices its
// labels select that run a release (development builds are never
// updated): exact for the percent, deterministic per device, and a
// device already reached (it reported on the release or runs it) stays
// reached.
package rollout

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

// Store keeps releases, the rollout and update reports: boltstore.Store
// implements it.
type Store interface {
	AddRelease(ctx context.Context, rec controlplane.ReleaseRecord) (controlplane.ReleaseRecord, error)
	CompleteRelease(ctx context.Context, version string) error
	SetInstallable(ctx context.Context, version string, installable bool) error
	Release(ctx context.Context, version string) (controlplane.ReleaseRecord, error)
	Releases(ctx context.Context) ([]controlplane.ReleaseRecord, error)
	SetRollout(ctx context.Context, r controlplane.Rollout) error
	Rollout(ctx context.Context) (controlplane.Rollout, bool, error)
	PutUpdateReport(ctx context.Context, r controlplane.UpdateReport) error
	UpdateReports(ctx context.Context, version string) (map[string]controlplane.UpdateReport, error)
	Devices(ctx context.Context) ([]controlplane.Device, error)
}

// Config configures a Manager.
type Config struct {
	// Store keeps the records. Required.
	Store Store
	// Dir holds the binaries, as Dir/VERSION/FILE. Required.
	Dir string
	// Keys are the release keys a published manifest must verify with.
	// Empty: every publish is refused.
	Keys release.Keys
	// PlanTTL is how long a computed RolloutPlan is reused (devices that
	// enrolled or changed version since are seen after it). Zero means 5s.
	PlanTTL time.Duration
	// OnChange is called after a release became complete or the rollout
	// changed (the control plane publishes it to relays). Nil: nothing.
	OnChange func(controlplane.ReleaseEvent)
	// Logger; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Manager runs releases and the rollout. It is safe for concurrent use.
type Manager struct {
	cfg Config
	log *slog.Logger

	mu     sync.Mutex // serialises rollout changes; guards plan
	plan   *controlplane.RolloutPlan
	planAt time.Time
}

// New returns a Manager.
func New(cfg Config) (*Manager, error) {
	if cfg.Store == nil || cfg.Dir == "" {
		return nil, errors.New("rollout: Store and Dir are required")
	}
	cfg.PlanTTL = cmp.Or(cfg.PlanTTL, 5*time.Second)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.OnChange == nil {
		cfg.OnChange = func(controlplane.ReleaseEvent) {}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create releases dir: %w", err)
	}
	return &Manager{cfg: cfg, log: log}, nil
}

// Publish accepts a release's manifest and signature (the .minisig file)
// when they verify with one of the configured keys; its binaries follow
// with PutArtifact. Publishing the same again is harmless; another
// manifest for a published version is a KindConflict.
func (m *Manager) Publish(ctx context.Context, manifest, sig []byte) (controlplane.ReleaseInfo, error) {
	if len(m.cfg.Keys) == 0 {
		return controlplane.ReleaseInfo{}, controlplane.Errorf(controlplane.KindInvalid, "this control plane trusts no release key (TETHER_RELEASE_KEYS is empty): it accepts no release")
	}
	man, err := release.Verify(manifest, sig, m.cfg.Keys)
	if err != nil {
		m.log.Warn("release refused", "err", err)
		return controlplane.ReleaseInfo{}, controlplane.Errorf(controlplane.KindInvalid, "release refused: %v", err)
	}
	rec, err := m.cfg.Store.AddRelease(ctx, controlplane.ReleaseRecord{
		Release:     controlplane.Release{Version: man.Version, Manifest: manifest, Signature: sig, CreatedAt: man.CreatedAt},
		PublishedAt: m.cfg.Now().UTC(),
	})
	if err != nil {
		return controlplane.ReleaseInfo{}, err
	}
	m.log.Info("release published", "version", man.Version, "arches", slices.Sorted(maps.Keys(man.Artifacts)))
	return m.complete(ctx, rec, man)
}

// PutArtifact stores the binary of one architecture of a published
// release, read from r: it must have the manifest's size and SHA-256
// (KindInvalid otherwise). The file appears complete or not at all.
func (m *Manager) PutArtifact(ctx context.Context, version, arch string, r io.Reader) (controlplane.ReleaseInfo, error) {
	rec, man, err := m.release(ctx, version)
	if err != nil {
		return controlplane.ReleaseInfo{}, err
	}
	a, ok := man.Artifacts[arch]
	if !ok {
		return controlplane.ReleaseInfo{}, controlplane.Errorf(controlplane.KindNotFound, "release %s has no binary for %q (it has %v)", version, arch, slices.Sorted(maps.Keys(man.Artifacts)))
	}
	if err := writeChecked(filepath.Join(m.cfg.Dir, version), a, r); err != nil {
		return controlplane.ReleaseInfo{}, err
	}
	m.log.Info("release binary stored", "version", version, "arch", arch, "size", a.Size)
	return m.complete(ctx, rec, man)
}

// writeChecked writes r to dir/a.File through a temporary file, checking
// size and SHA-256 before the rename, and syncs file and directory.
func writeChecked(dir string, a release.Artifact, r io.Reader) (err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create release dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+a.File+".*.tmp")
	if err != nil {
		return fmt.Errorf("store binary: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(r, a.Size+1))
	if err != nil {
		return fmt.Errorf("receive %s: %w", a.File, err)
	}
	if n != a.Size {
		return controlplane.Errorf(controlplane.KindInvalid, "%s is %d bytes or more, the signed manifest says %d", a.File, n, a.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != a.SHA256 {
		return controlplane.Errorf(controlplane.KindInvalid, "%s has SHA-256 %s, the signed manifest says %s", a.File, got, a.SHA256)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", a.File, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", a.File, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, a.File)); err != nil {
		return fmt.Errorf("store %s: %w", a.File, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync release dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync release dir: %w", err)
	}
	return nil
}

// release reads a published release and parses its manifest (verified
// when it was published).
func (m *Manager) release(ctx context.Context, version string) (controlplane.ReleaseRecord, release.Manifest, error) {
	if !release.IsRelease(version) {
		return controlplane.ReleaseRecord{}, release.Manifest{}, controlplane.Errorf(controlplane.KindInvalid, "%q is not a release version (vMAJOR.MINOR.PATCH)", version)
	}
	rec, err := m.cfg.Store.Release(ctx, version)
	if err != nil {
		return rec, release.Manifest{}, err
	}
	man, err := release.Parse(rec.Manifest)
	if err != nil {
		return rec, man, fmt.Errorf("stored release %s: %w", version, err)
	}
	return rec, man, nil
}

// missing lists the architectures whose binary is not stored.
func (m *Manager) missing(man release.Manifest) []string {
	var out []string
	for _, arch := range slices.Sorted(maps.Keys(man.Artifacts)) {
		a := man.Artifacts[arch]
		fi, err := os.Stat(filepath.Join(m.cfg.Dir, man.Version, a.File))
		if err != nil || fi.Size() != a.Size {
			out = append(out, arch)
		}
	}
	return out
}

// complete marks the release complete once every binary is stored.
func (m *Manager) complete(ctx context.Context, rec controlplane.ReleaseRecord, man release.Manifest) (controlplane.ReleaseInfo, error) {
	missing := m.missing(man)
	if len(missing) == 0 && !rec.Complete {
		if err := m.cfg.Store.CompleteRelease(ctx, rec.Version); err != nil {
			return controlplane.ReleaseInfo{}, err
		}
		rec.Complete = true
		m.log.Info("release complete", "version", rec.Version)
		m.cfg.OnChange(controlplane.ReleaseEvent{Kind: controlplane.ReleaseEventPublished, Version: rec.Version})
	}
	return info(rec, man, missing), nil
}

func info(rec controlplane.ReleaseRecord, man release.Manifest, missing []string) controlplane.ReleaseInfo {
	return controlplane.ReleaseInfo{
		Version: man.Version, MinVersion: man.MinVersion, Floor: man.Floor, CreatedAt: man.CreatedAt,
		PublishedAt: rec.PublishedAt, Arches: slices.Sorted(maps.Keys(man.Artifacts)), Missing: missing, Complete: rec.Complete,
	}
}

// Releases lists the published releases, newest version first.
func (m *Manager) Releases(ctx context.Context) ([]controlplane.ReleaseInfo, error) {
	recs, err := m.cfg.Store.Releases(ctx)
	if err != nil {
		return nil, err
	}
	out := []controlplane.ReleaseInfo{}
	for _, rec := range recs {
		man, err := release.Parse(rec.Manifest)
		if err != nil {
			m.log.Error("stored release does not parse", "version", rec.Version, "err", err)
			continue
		}
		var missing []string
		if !rec.Complete {
			missing = m.missing(man)
		}
		out = append(out, info(rec, man, missing))
	}
	slices.SortFunc(out, func(a, b controlplane.ReleaseInfo) int { return -versionCmp(a.Version, b.Version) })
	return out, nil
}

func versionCmp(a, b string) int {
	c, _ := release.Compare(a, b)
	return c
}

// Get returns a complete release (KindNotFound otherwise).
func (m *Manager) Get(ctx context.Context, version string) (controlplane.Release, error) {
	rec, _, err := m.release(ctx, version)
	if err != nil {
		return controlplane.Release{}, err
	}
	if !rec.Complete {
		return controlplane.Release{}, controlplane.Errorf(controlplane.KindNotFound, "release %s is not complete: binaries are missing", version)
	}
	return rec.Release, nil
}

// Latest returns what a new device installs: the complete release of the
// highest version among the installable ones (rolled out to the whole
// fleet, not aborted), or, while none ever was, of all; ok is false when
// there is none.
func (m *Manager) Latest(ctx context.Context) (controlplane.Release, bool, error) {
	recs, err := m.cfg.Store.Releases(ctx)
	if err != nil {
		return controlplane.Release{}, false, err
	}
	var best *controlplane.ReleaseRecord
	someInstallable := slices.ContainsFunc(recs, func(r controlplane.ReleaseRecord) bool { return r.Complete && r.Installable })
	for i, rec := range recs {
		if rec.Complete && (rec.Installable || !someInstallable) && (best == nil || versionCmp(rec.Version, best.Version) > 0) {
			best = &recs[i]
		}
	}
	if best == nil {
		return controlplane.Release{}, false, nil
	}
	return best.Release, true, nil
}

// ReadArtifact reads the binary of a complete release at off into p and
// returns how many bytes it read and the binary's size. Reading at or
// past the end reads nothing.
func (m *Manager) ReadArtifact(ctx context.Context, version, arch string, off int64, p []byte) (int, int64, error) {
	rec, man, err := m.release(ctx, version)
	if err != nil {
		return 0, 0, err
	}
	a, ok := man.Artifacts[arch]
	if !ok || !rec.Complete {
		return 0, 0, controlplane.Errorf(controlplane.KindNotFound, "release %s has no binary for %q", version, arch)
	}
	if off < 0 || off > a.Size {
		return 0, 0, controlplane.Errorf(controlplane.KindInvalid, "offset %d out of range (size %d)", off, a.Size)
	}
	f, err := os.Open(filepath.Join(m.cfg.Dir, version, a.File))
	if err != nil {
		return 0, 0, fmt.Errorf("open binary: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || fi.Size() != a.Size {
		return 0, 0, fmt.Errorf("binary %s of %s: not the manifest's size (%v)", a.File, version, err)
	}
	n, err := f.ReadAt(p, off)
	if err == io.EOF {
		err = nil
	}
	return n, a.Size, err
}

// Start starts a rollout of a complete release to percent (0 to 100) of
// the devices carrying every label. It replaces the current rollout.
func (m *Manager) Start(ctx context.Context, version string, labels map[string]string, percent int) (controlplane.Rollout, error) {
	if percent < 0 || percent > 100 {
		return controlplane.Rollout{}, controlplane.Errorf(controlplane.KindInvalid, "percent %d: want 0 to 100", percent)
	}
	if _, err := m.Get(ctx, version); err != nil {
		return controlplane.Rollout{}, err
	}
	for k, v := range labels {
		if k == "" || len(k) > 63 || len(v) > 255 {
			return controlplane.Rollout{}, controlplane.Errorf(controlplane.KindInvalid, "label %q=%q: want a key of 1 to 63 characters and a value of at most 255", k, v)
		}
	}
	if len(labels) == 0 {
		labels = nil
	}
	now := m.cfg.Now().UTC()
	return m.change(ctx, func(controlplane.Rollout, bool) (controlplane.Rollout, error) {
		return controlplane.Rollout{Version: version, Labels: labels, Percent: percent, State: controlplane.RolloutActive, StartedAt: now, UpdatedAt: now}, nil
	})
}

// SetPercent changes the current rollout's percent. Devices already
// reached stay reached when it falls.
func (m *Manager) SetPercent(ctx context.Context, percent int) (controlplane.Rollout, error) {
	if percent < 0 || percent > 100 {
		return controlplane.Rollout{}, controlplane.Errorf(controlplane.KindInvalid, "percent %d: want 0 to 100", percent)
	}
	return m.change(ctx, func(r controlplane.Rollout, ok bool) (controlplane.Rollout, error) {
		if err := changeable(r, ok); err != nil {
			return r, err
		}
		r.Percent = percent
		return r, nil
	})
}

// Pause stops offering the current rollout's release until Resume.
func (m *Manager) Pause(ctx context.Context) (controlplane.Rollout, error) {
	return m.setState(ctx, controlplane.RolloutPaused)
}

// Resume resumes a paused rollout.
func (m *Manager) Resume(ctx context.Context) (controlplane.Rollout, error) {
	return m.setState(ctx, controlplane.RolloutActive)
}

// Abort ends the current rollout for good: its release is offered no
// more (devices keep what they run: agents never downgrade).
func (m *Manager) Abort(ctx context.Context) (controlplane.Rollout, error) {
	return m.setState(ctx, controlplane.RolloutAborted)
}

func (m *Manager) setState(ctx context.Context, state string) (controlplane.Rollout, error) {
	return m.change(ctx, func(r controlplane.Rollout, ok bool) (controlplane.Rollout, error) {
		if err := changeable(r, ok); err != nil {
			return r, err
		}
		r.State = state
		return r, nil
	})
}

func changeable(r controlplane.Rollout, ok bool) error {
	if !ok {
		return controlplane.Errorf(controlplane.KindNotFound, "no rollout: start one (tetherctl rollout start VERSION)")
	}
	if r.State == controlplane.RolloutAborted {
		return controlplane.Errorf(controlplane.KindConflict, "the rollout of %s was aborted: start a new one", r.Version)
	}
	return nil
}

// change applies fn to the current rollout under the lock, records it,
// drops the cached plan and announces the change.
func (m *Manager) change(ctx context.Context, fn func(controlplane.Rollout, bool) (controlplane.Rollout, error)) (controlplane.Rollout, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	cur, ok, err := m.cfg.Store.Rollout(ctx)
	if err != nil {
		return cur, err
	}
	next, err := fn(cur, ok)
	if err != nil {
		return cur, err
	}
	next.UpdatedAt = m.cfg.Now().UTC()
	if err := m.cfg.Store.SetRollout(ctx, next); err != nil {
		return cur, err
	}
	// New devices install a release once it went to the whole fleet, and
	// no more once that rollout is aborted.
	switch {
	case next.State == controlplane.RolloutActive && next.Percent == 100 && len(next.Labels) == 0:
		err = m.cfg.Store.SetInstallable(ctx, next.Version, true)
	case next.State == controlplane.RolloutAborted:
		err = m.cfg.Store.SetInstallable(ctx, next.Version, false)
	}
	if err != nil {
		return cur, err
	}
	m.plan = nil
	m.log.Info("rollout changed", "version", next.Version, "state", next.State, "percent", next.Percent, "labels", next.Labels)
	m.cfg.OnChange(controlplane.ReleaseEvent{Kind: controlplane.ReleaseEventRollout, Version: next.Version})
	return next, nil
}

// Report records an agent's update status on a published release.
func (m *Manager) Report(ctx context.Context, r controlplane.UpdateReport) error {
	if !release.IsRelease(r.Version) {
		return controlplane.Errorf(controlplane.KindInvalid, "update report on %q: not a release version", r.Version)
	}
	switch r.State {
	case frames.UpdateDownloading, frames.UpdateApplied, frames.UpdateHealthy, frames.UpdateRolledBack, frames.UpdateFailed, frames.UpdateRefused:
	default:
		return controlplane.Errorf(controlplane.KindInvalid, "update report: unknown state %q", r.State)
	}
	if len(r.Reason) > 1024 {
		r.Reason = r.Reason[:1024]
	}
	if r.At.IsZero() {
		r.At = m.cfg.Now().UTC()
	}
	if err := m.cfg.Store.PutUpdateReport(ctx, r); err != nil {
		return err
	}
	if excluded(r.State) {
		m.mu.Lock()
		m.plan = nil
		m.mu.Unlock()
	}
	lvl := slog.LevelInfo
	if r.State == frames.UpdateRolledBack || r.State == frames.UpdateFailed {
		lvl = slog.LevelWarn
	}
	m.log.Log(ctx, lvl, "agent update", "device_id", r.DeviceID, "version", r.Version, "state", r.State, "reason", r.Reason, "relay", r.Relay)
	return nil
}

// excluded: a device that reported this state is not offered the release
// again.
func excluded(state string) bool {
	return state == frames.UpdateRefused || state == frames.UpdateRolledBack
}

// Plan returns what relays offer now: the current rollout, its release,
// and the devices chosen that neither run it nor refused it or rolled
// back from it. It is computed at most every PlanTTL unless the rollout
// changed.
func (m *Manager) Plan(ctx context.Context) (controlplane.RolloutPlan, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.cfg.Now()
	if m.plan != nil && now.Sub(m.planAt) < m.cfg.PlanTTL {
		return *m.plan, nil
	}
	ro, ok, err := m.cfg.Store.Rollout(ctx)
	if err != nil {
		return controlplane.RolloutPlan{}, err
	}
	if !ok {
		m.plan, m.planAt = &controlplane.RolloutPlan{}, now
		return *m.plan, nil
	}
	plan := controlplane.RolloutPlan{Rollout: &ro}
	rel, err := m.Get(ctx, ro.Version)
	if err != nil {
		return controlplane.RolloutPlan{}, err
	}
	plan.Release = &rel
	if ro.State == controlplane.RolloutActive {
		ev, err := m.evaluate(ctx, ro)
		if err != nil {
			return controlplane.RolloutPlan{}, err
		}
		for _, d := range ev.devices {
			if ev.chosen[d.ID] && !excluded(ev.reports[d.ID].State) && !runs(d.AgentVersion, ro.Version) {
				plan.Devices = append(plan.Devices, d.ID)
			}
		}
		slices.Sort(plan.Devices)
	}
	m.plan, m.planAt = &plan, now
	return plan, nil
}

// runs: an agent at version current runs version (or newer).
func runs(current, version string) bool {
	c, err := release.Compare(current, version)
	return err == nil && c >= 0
}

type evaluation struct {
	devices []controlplane.Device // selected by the labels, not revoked
	reports map[string]controlplane.UpdateReport
	chosen  map[string]bool
}

// evaluate applies a rollout to the fleet as it is now.
func (m *Manager) evaluate(ctx context.Context, ro controlplane.Rollout) (evaluation, error) {
	all, err := m.cfg.Store.Devices(ctx)
	if err != nil {
		return evaluation{}, err
	}
	reports, err := m.cfg.Store.UpdateReports(ctx, ro.Version)
	if err != nil {
		return evaluation{}, err
	}
	ev := evaluation{reports: reports, chosen: map[string]bool{}}
	var ids []string
	for _, d := range all {
		if d.Revoked || !matches(d.Labels, ro.Labels) {
			continue
		}
		ev.devices = append(ev.devices, d)
		if release.IsRelease(d.AgentVersion) {
			ids = append(ids, d.ID)
		}
	}
	byID := map[string]controlplane.Device{}
	for _, d := range ev.devices {
		byID[d.ID] = d
	}
	sticky := func(id string) bool {
		_, reported := reports[id]
		return reported || runs(byID[id].AgentVersion, ro.Version)
	}
	for _, id := range release.Choose(ids, ro.Version, ro.Percent, sticky) {
		ev.chosen[id] = true
	}
	return ev, nil
}

func matches(labels, selector map[string]string) bool {
	for k, v := range selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Status tells where the current rollout is: its devices by version and
// by state, and each device's line.
func (m *Manager) Status(ctx context.Context) (controlplane.RolloutStatus, error) {
	st := controlplane.RolloutStatus{Versions: map[string]int{}, States: map[string]int{}, Devices: []controlplane.DeviceUpdate{}}
	ro, ok, err := m.cfg.Store.Rollout(ctx)
	if err != nil || !ok {
		return st, err
	}
	st.Rollout = &ro
	ev, err := m.evaluate(ctx, ro)
	if err != nil {
		return st, err
	}
	st.Matching, st.Chosen = len(ev.devices), len(ev.chosen)
	for _, d := range ev.devices {
		u := controlplane.DeviceUpdate{DeviceID: d.ID, Name: d.Name, AgentVersion: d.AgentVersion, Online: d.Online}
		r, reported := ev.reports[d.ID]
		switch {
		case !release.IsRelease(d.AgentVersion) && !reported:
			u.State = controlplane.UpdateDevBuild
		case reported:
			u.State, u.Reason, u.At = r.State, r.Reason, r.At
		case runs(d.AgentVersion, ro.Version):
			u.State = controlplane.UpdateUpToDate
		case ev.chosen[d.ID]:
			u.State = controlplane.UpdatePending
		default:
			u.State = controlplane.UpdateNotSelected
		}
		st.Versions[cmp.Or(d.AgentVersion, "unknown")]++
		st.States[u.State]++
		st.Devices = append(st.Devices, u)
	}
	return st, nil
}
