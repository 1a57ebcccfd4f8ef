package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
	"golang.org/x/time/rate"
)

// Agent updates on a session (frames/spec.md "Agent updates"): the relay
// asks Config.Releases which release the device should run, soon after
// the session is up and then every UpdateInterval (jittered), and offers
// it on the control stream; it serves the binary on streams the agent
// opens with Fetch, only for a version offered on this session, one at a
// time; it passes the agent's update-status frames on to the control
// plane. Without Config.Releases nothing is offered and every fetch is
// refused.

const (
	// maxOffered bounds the versions remembered per session.
	maxOffered = 16
	// reportQueueLen bounds the update reports waiting for the control
	// plane; beyond it they are dropped (an agent that floods them).
	reportQueueLen = 8
	// reportRate and reportBurst bound the reports of one session (each
	// is a write on the control plane): an update takes four or five.
	reportRate  = rate.Limit(0.2)
	reportBurst = 8
	// fetchIdle bounds the wait for a fetch frame and each write of the
	// binary; fetchMax bounds a whole download (1 MiB/s and slower links
	// take minutes for an agent).
	fetchIdle = 60 * time.Second
	fetchMax  = 2 * time.Hour
)

// sessionUpdates is a session's share of agent updates.
type sessionUpdates struct {
	agentVersion string // as the agent's hello said

	mu       sync.Mutex
	offered  map[string]bool // versions offered on this session: fetchable
	answered map[string]bool // versions the agent refused, failed or rolled back: not offered again here

	fetching atomic.Bool // a fetch stream is being served
	reports  chan controlplane.UpdateReport
	limit    *rate.Limiter  // of reports (the control loop's own)
	wg       sync.WaitGroup // offer loop, accept loop, fetch, reports
}

// startUpdates starts the session's update work once it is routable: the
// offer loop (with Config.Releases), the loop accepting the streams the
// agent opens, and the report sender. waitUpdates waits for them after
// the session closed.
func (sess *session) startUpdates() {
	u := &sess.upd
	u.offered, u.answered = map[string]bool{}, map[string]bool{}
	u.reports = make(chan controlplane.UpdateReport, reportQueueLen)
	u.limit = rate.NewLimiter(reportRate, reportBurst)
	u.wg.Go(sess.acceptAgentStreams)
	if sess.srv.cfg.Releases == nil {
		return
	}
	u.wg.Go(sess.offerLoop)
	u.wg.Go(sess.sendReports)
}

func (sess *session) waitUpdates() { sess.upd.wg.Wait() }

// offerLoop asks for an offer soon after the session is up (within a few
// seconds, spread so that a relay's agents reconnecting at once do not
// ask at once), then every UpdateInterval, jittered ±50%.
func (sess *session) offerLoop() {
	interval := sess.srv.cfg.UpdateInterval
	wait := rand.N(min(interval/4, 5*time.Second)) + time.Millisecond
	for {
		t := time.NewTimer(wait)
		select {
		case <-sess.closed:
			t.Stop()
			return
		case <-t.C:
		}
		sess.offerUpdate()
		wait = interval/2 + rand.N(interval)
	}
}

// offerUpdate offers the release the control plane picks for the device,
// unless the agent is downloading, or already had that offer on this
// session.
func (sess *session) offerUpdate() {
	s, u := sess.srv, &sess.upd
	if u.fetching.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cpTimeout())
	rel, ok, err := s.cfg.Releases.Offer(ctx, sess.deviceID, u.agentVersion)
	cancel()
	if err != nil {
		sess.log.Debug("ask for an agent update", "err", err)
		return
	}
	if !ok {
		return
	}
	if len(rel.Manifest) > frames.MaxBlob || len(rel.Signature) > frames.MaxBlob || len(rel.Version) > frames.MaxString {
		sess.log.Warn("agent release too large to offer", "version", rel.Version, "manifest", len(rel.Manifest), "signature", len(rel.Signature))
		return
	}
	u.mu.Lock()
	skip := u.offered[rel.Version] || u.answered[rel.Version] || len(u.offered) >= maxOffered
	if !skip {
		u.offered[rel.Version] = true
	}
	u.mu.Unlock()
	if skip {
		return
	}
	sess.log.Info("offering agent update", "version", rel.Version, "agent_version", u.agentVersion)
	s.metrics.updateOffers.Inc()
	sess.send(&frames.UpdateOffer{Version: rel.Version, Manifest: rel.Manifest, Signature: rel.Signature})
}

// updateStatus takes an update-status frame from the control loop: it
// never blocks (the report is queued for sendReports, or dropped).
func (sess *session) updateStatus(m *frames.UpdateStatus) {
	u := &sess.upd
	switch m.State {
	case frames.UpdateDownloading, frames.UpdateApplied, frames.UpdateHealthy:
	case frames.UpdateRefused, frames.UpdateFailed, frames.UpdateRolledBack:
		u.mu.Lock()
		if len(u.answered) < maxOffered {
			u.answered[m.Version] = true
		}
		u.mu.Unlock()
	default:
		return // a state this relay does not know
	}
	if !u.limit.Allow() {
		sess.srv.metrics.updateReports.WithLabelValues("dropped").Inc()
		sess.log.Debug("agent update status dropped: too many", "version", m.Version, "state", m.State)
		return
	}
	sess.srv.metrics.updateReports.WithLabelValues(m.State).Inc()
	sess.log.Info("agent update status", "version", m.Version, "state", m.State, "reason", m.Reason)
	if sess.srv.cfg.Releases == nil {
		return
	}
	r := controlplane.UpdateReport{DeviceID: sess.deviceID, Version: m.Version, State: m.State, Reason: m.Reason,
		Relay: sess.srv.cfg.RelayID, At: time.Now().UTC()}
	select {
	case u.reports <- r:
	default:
		sess.log.Warn("agent update reports queue full: report dropped", "version", m.Version, "state", m.State)
	}
}

// sendReports passes the queued update reports to the control plane
// until the session closes, then those still queued.
func (sess *session) sendReports() {
	s, u := sess.srv, &sess.upd
	send := func(r controlplane.UpdateReport) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.cfg.Releases.ReportUpdate(ctx, r); err != nil {
			sess.log.Warn("report agent update to the control plane", "version", r.Version, "state", r.State, "err", err)
		}
	}
	for {
		select {
		case r := <-u.reports:
			send(r)
		case <-sess.closed:
			for {
				select {
				case r := <-u.reports:
					send(r)
				default:
					return
				}
			}
		}
	}
}

// acceptAgentStreams accepts the streams the agent opens until the
// session closes. Only a download is served, one at a time: a stream
// opened while one is served is closed unread.
func (sess *session) acceptAgentStreams() {
	for {
		st, err := sess.mux.AcceptStream()
		if err != nil {
			return
		}
		if !sess.upd.fetching.CompareAndSwap(false, true) {
			sess.srv.metrics.updateDownloads.WithLabelValues("busy").Inc()
			st.Close()
			continue
		}
		sess.upd.wg.Go(func() {
			defer st.Close() // after the flag: once the agent sees the end, it may fetch again
			defer sess.upd.fetching.Store(false)
			sess.serveFetch(st)
		})
	}
}

// serveFetch serves one download stream: a Fetch of a version offered on
// this session, answered StreamAccept and the binary from the offset to
// its end, or StreamRefuse.
func (sess *session) serveFetch(st *smux.Stream) {
	s := sess.srv
	st.SetReadDeadline(time.Now().Add(fetchIdle))
	m, err := frames.Read(st, 4096)
	if err != nil {
		return
	}
	f, ok := m.(*frames.Fetch)
	if !ok {
		return // not a stream this relay serves
	}
	st.SetReadDeadline(time.Time{})
	refuse := func(code frames.ErrorCode, msg string) {
		s.metrics.updateDownloads.WithLabelValues("refused").Inc()
		sess.log.Info("agent update download refused", "version", f.Version, "arch", f.Arch, "reason", msg)
		frames.WriteTimeout(st, &frames.StreamRefuse{Code: code, Message: msg}, writeTimeout)
	}
	if s.cfg.Releases == nil {
		refuse(frames.CodeBadRequest, "this relay offers no agent updates")
		return
	}
	if !sess.mayFetch(f.Version) {
		refuse(frames.CodeBadRequest, fmt.Sprintf("version %q was not offered to this device", f.Version))
		return
	}
	if f.Offset > 1<<62 {
		refuse(frames.CodeBadRequest, "offset out of range")
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, fetchMax)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { st.Close() })
	defer stop()
	rc, size, err := s.cfg.Releases.OpenArtifact(ctx, f.Version, f.Arch, int64(f.Offset))
	if err != nil {
		code := frames.CodeUnavailable
		if k := controlplane.KindOf(err); k == controlplane.KindNotFound || k == controlplane.KindInvalid {
			code = frames.CodeBadRequest
		}
		refuse(code, fmt.Sprintf("open %s for %s: %v", f.Version, f.Arch, err))
		return
	}
	defer rc.Close()
	if int64(f.Offset) > size {
		refuse(frames.CodeBadRequest, fmt.Sprintf("offset %d is past the end (%d bytes)", f.Offset, size))
		return
	}
	if err := frames.WriteTimeout(st, &frames.StreamAccept{}, writeTimeout); err != nil {
		return
	}
	n, err := copyDeadline(st, io.LimitReader(rc, size-int64(f.Offset)), fetchIdle)
	s.metrics.updateBytes.Add(float64(n))
	if err != nil && !errors.Is(err, io.EOF) {
		s.metrics.updateDownloads.WithLabelValues("cut").Inc()
		sess.log.Info("agent update download ended early", "version", f.Version, "arch", f.Arch, "offset", f.Offset, "sent", n, "err", err)
		return
	}
	s.metrics.updateDownloads.WithLabelValues("served").Inc()
	sess.log.Debug("agent update download served", "version", f.Version, "arch", f.Arch, "offset", f.Offset, "sent", n)
}

// mayFetch reports whether the agent may download version: it was
// offered on this session, or it is what the control plane would offer
// now (an agent resuming, on a new session, a download its previous
// session was offered, asks before this session's first offer).
func (sess *session) mayFetch(version string) bool {
	u := &sess.upd
	u.mu.Lock()
	offered := u.offered[version]
	u.mu.Unlock()
	if offered {
		return true
	}
	ctx, cancel := context.WithTimeout(sess.srv.ctx, sess.srv.cpTimeout())
	rel, ok, err := sess.srv.cfg.Releases.Offer(ctx, sess.deviceID, u.agentVersion)
	cancel()
	if err != nil || !ok || rel.Version != version {
		return false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.offered) < maxOffered {
		u.offered[version] = true
	}
	return true
}

// copyDeadline copies r to st, each write under its own deadline (a
// rate-limited agent reads slowly, not never).
func copyDeadline(st *smux.Stream, r io.Reader, idle time.Duration) (int64, error) {
	buf := make([]byte, 32<<10)
	var n int64
	for {
		k, rerr := r.Read(buf)
		if k > 0 {
			st.SetWriteDeadline(time.Now().Add(idle))
			if _, err := st.Write(buf[:k]); err != nil {
				return n, err
			}
			n += int64(k)
		}
		if rerr != nil {
			return n, rerr
		}
	}
}
