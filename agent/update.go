package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"github.com/tetherfleet/tether/agent/update"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"golang.org/x/time/rate"
)

// Updates: how the agent takes a release the relay offers (frames
// UpdateOffer): it checks the signed manifest (checkOffer), downloads its
// binary over streams of its own session (Fetch), resuming where a broken
// one stopped and at most Config.UpdateRate bytes a second, then lets
// package update swap it in, and Run returns update.ErrRestart for the
// caller to re-execute. One update at a time; the outcome of the last one
// is reported on the next session.

const (
	// healthyAfter is how many heartbeat acknowledgements make a new
	// version healthy.
	healthyAfter = 2
	// fetchChunk is the most read from a download stream at once (and the
	// rate limiter's burst, unless the rate is lower).
	fetchChunk = 32 << 10
	// fetchIdle bounds the wait for the relay's answer and for each chunk.
	fetchIdle = 30 * time.Second
	// fetchTries bounds the fetches in a row that bring no byte.
	fetchTries = 8
	// maxReason bounds the reason sent in an update status.
	maxReason = 300
)

// Arch is the release manifest's architecture key of this binary:
// runtime.GOARCH, and for 32-bit ARM "armv" and the GOARM it was built
// with (from the build info; "arm" if it is missing).
func Arch() string {
	if runtime.GOARCH != "arm" {
		return runtime.GOARCH
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "GOARM" {
				v, _, _ := strings.Cut(s.Value, ",")
				return "armv" + v
			}
		}
	}
	return "arm"
}

// checkOffer decides whether to take an offered release: its manifest
// must verify with the agent's release keys and name the offered version,
// the version must be one the agent may update to from its own (newer,
// min_version, floors) and one that never rolled back here, and the
// release must have a binary for this architecture. It returns what the
// swap checks the binary against.
func (a *Agent) checkOffer(o *frames.UpdateOffer) (update.Release, error) {
	u := a.cfg.Updater
	if u == nil {
		return update.Release{}, errors.New("this agent does not update itself (no updater configured)")
	}
	m, err := release.Verify(o.Manifest, o.Signature, a.cfg.ReleaseKeys)
	if err != nil {
		return update.Release{}, err
	}
	if m.Version != o.Version {
		return update.Release{}, fmt.Errorf("offered as %q, but its signed manifest is %s", o.Version, m.Version)
	}
	if _, pending := u.Pending(); pending {
		return update.Release{}, fmt.Errorf("this version (%s) is a new one not yet healthy", a.cfg.Version)
	}
	if reason, refused := u.Refuses(m.Version); refused {
		return update.Release{}, errors.New(reason)
	}
	if err := m.CanUpdateFrom(a.cfg.Version, u.Floor()); err != nil {
		return update.Release{}, err
	}
	art, ok := m.Artifacts[a.cfg.Arch]
	if !ok {
		return update.Release{}, fmt.Errorf("release %s has no binary for %s", m.Version, a.cfg.Arch)
	}
	return update.Release{Version: m.Version, Floor: m.Floor, Size: art.Size, SHA256: art.SHA256}, nil
}

// offer handles an UpdateOffer from the control stream without blocking
// it: one update at a time, the others are ignored while it runs.
func (a *Agent) offer(ctx context.Context, o *frames.UpdateOffer) {
	if !a.updating.CompareAndSwap(false, true) {
		return
	}
	a.wg.Go(func() {
		defer a.updating.Store(false)
		a.takeOffer(ctx, o)
	})
}

func (a *Agent) takeOffer(ctx context.Context, o *frames.UpdateOffer) {
	rel, err := a.checkOffer(o)
	if err != nil {
		a.log.Warn("agent update refused", "version", o.Version, "reason", err)
		a.report(o.Version, frames.UpdateRefused, err.Error())
		return
	}
	a.log.Info("agent update offered: downloading", "version", rel.Version, "size", rel.Size, "arch", a.cfg.Arch)
	a.report(rel.Version, frames.UpdateDownloading, "")
	if err := a.download(ctx, rel); err != nil {
		if ctx.Err() != nil {
			return // shutting down: the partial file waits for the next offer
		}
		a.log.Warn("agent update download failed", "version", rel.Version, "err", err)
		a.report(rel.Version, frames.UpdateFailed, err.Error())
		return
	}
	if err := a.cfg.Updater.Swap(rel); err != nil {
		a.cfg.Updater.Discard()
		a.log.Error("agent update failed", "version", rel.Version, "err", err)
		a.report(rel.Version, frames.UpdateFailed, err.Error())
		return
	}
	a.restart(update.ErrRestart)
}

// download fetches rel's binary into NAME.new, resuming what an earlier
// download of the same release left there. It gives up after fetchTries
// fetches in a row that brought nothing.
func (a *Agent) download(ctx context.Context, rel update.Release) error {
	f, off, err := a.cfg.Updater.Resume(rel)
	if err != nil {
		return err
	}
	defer f.Close()
	if off > 0 {
		a.log.Info("agent update download resumes", "version", rel.Version, "at", off, "of", rel.Size)
	}
	lim := rate.NewLimiter(rate.Limit(a.cfg.UpdateRate), min(a.cfg.UpdateRate, fetchChunk))
	bo := &backoff{base: time.Second, max: 30 * time.Second}
	var lastErr error
	for tries := 0; off < rel.Size; tries++ {
		if tries == fetchTries {
			return fmt.Errorf("download %s: %d tries without progress at byte %d of %d: %w", rel.Version, tries, off, rel.Size, lastErr)
		}
		n, err := a.fetch(ctx, rel, f, off, lim)
		off += n
		if n > 0 {
			tries, bo.n = 0, 0
		}
		if err == nil {
			continue
		}
		var refused *fetchRefused
		if errors.As(err, &refused) {
			return err // the relay will not serve it: retrying would not help
		}
		lastErr = err
		if off < rel.Size {
			a.log.Info("agent update download interrupted; resuming", "version", rel.Version, "at", off, "of", rel.Size, "err", err)
			if err := sleepCtx(ctx, bo.next()); err != nil {
				return err
			}
		}
	}
	return nil
}

// fetchRefused is the relay's StreamRefuse to a Fetch.
type fetchRefused struct{ *frames.StreamRefuse }

func (e *fetchRefused) Error() string { return "relay refused the download: " + e.Message }

// fetch downloads from off to the end of rel's binary over one stream of
// the current session, writing to w at most lim allows. It returns the
// bytes written; a stream that ends before the end is an error.
func (a *Agent) fetch(ctx context.Context, rel update.Release, w io.Writer, off int64, lim *rate.Limiter) (int64, error) {
	c := a.cur.Load()
	if c == nil {
		return 0, errors.New("no session to a relay")
	}
	st, err := c.mux.OpenStream()
	if err != nil {
		return 0, fmt.Errorf("open download stream: %w", err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Close() })
	defer stop()
	if err := frames.WriteTimeout(st, &frames.Fetch{Version: rel.Version, Arch: a.cfg.Arch, Offset: uint64(off)}, writeTimeout); err != nil {
		return 0, fmt.Errorf("send fetch: %w", err)
	}
	st.SetReadDeadline(time.Now().Add(fetchIdle))
	m, err := frames.Read(st, 4096)
	if err != nil {
		return 0, fmt.Errorf("read fetch answer: %w", err)
	}
	switch m := m.(type) {
	case *frames.StreamAccept:
	case *frames.StreamRefuse:
		return 0, &fetchRefused{m}
	default:
		return 0, fmt.Errorf("unexpected %v frame answering fetch", m.Type())
	}
	buf := make([]byte, lim.Burst())
	var n int64
	for off+n < rel.Size {
		st.SetReadDeadline(time.Now().Add(fetchIdle))
		k, err := st.Read(buf[:min(int64(len(buf)), rel.Size-off-n)])
		if k > 0 {
			if err := lim.WaitN(ctx, k); err != nil {
				return n, err
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return n, fmt.Errorf("write download: %w", err)
			}
			n += int64(k)
		}
		if errors.Is(err, io.EOF) && off+n < rel.Size {
			return n, fmt.Errorf("download stream ended at byte %d of %d: %w", off+n, rel.Size, io.ErrUnexpectedEOF)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return n, fmt.Errorf("read download: %w", err)
		}
	}
	return n, nil
}

// report sends an update status on the current session, if any; a status
// that cannot be sent is dropped (the outcome that matters, recorded by
// package update, is sent on the next session).
func (a *Agent) report(version, state, reason string) bool {
	c := a.cur.Load()
	if c == nil {
		return false
	}
	if len(reason) > maxReason {
		reason = reason[:maxReason]
	}
	return c.write(&frames.UpdateStatus{Version: version, State: state, Reason: reason}) == nil
}

// sessionUp tells the relay what it should know of updates as a session
// starts: the last update's outcome not reported yet, and that this
// version is a new one proving itself.
func (a *Agent) sessionUp() {
	u := a.cfg.Updater
	if u == nil {
		return
	}
	if v, st, reason, ok := u.Report(); ok && a.report(v, st, reason) {
		if err := u.Reported(); err != nil {
			a.log.Warn("record update report", "err", err)
		}
	}
	if _, pending := u.Pending(); pending && a.appliedSent.CompareAndSwap(false, true) {
		a.report(a.cfg.Version, frames.UpdateApplied, "")
	}
}

// acked counts a session's heartbeat acknowledgements: the first ones
// make a pending new version healthy.
func (a *Agent) acked(n int) {
	u := a.cfg.Updater
	if u == nil || n != healthyAfter {
		return
	}
	if _, pending := u.Pending(); !pending {
		return
	}
	if err := u.MarkHealthy(); err != nil {
		a.log.Error("record update healthy", "err", err)
		return
	}
	a.healthyOnce.Do(func() { close(a.healthy) })
	a.sessionUp() // reports healthy
}

// watch runs the update watchdog (update.Updater.Watch) for the life of
// Run; a rollback ends Run with update.ErrRestart.
func (a *Agent) watch(ctx context.Context) {
	if a.cfg.Updater == nil {
		return
	}
	a.wg.Go(func() {
		err := a.cfg.Updater.Watch(ctx, a.healthy)
		if errors.Is(err, update.ErrRestart) {
			a.restart(err)
		} else if err != nil {
			a.log.Error("update watchdog", "err", err)
		}
	})
}
