package relay

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/replica"
)

const (
	// eventQueueLen bounds the device events waiting for the follow loop;
	// beyond it they are dropped and a snapshot replaces them.
	eventQueueLen = 8192
	// eventBatch is the most events applied in one replica transaction.
	eventBatch = 256
	// snapshotTimeout bounds reading a whole snapshot.
	snapshotTimeout = time.Minute
	// Retry delays of the loops that reach the control plane: from
	// retryMin, doubling up to retryMax.
	retryMin = 500 * time.Millisecond
	retryMax = 10 * time.Second
)

// queueEvent is the Watch callback: it queues an event for the follow
// loop and never blocks NATS's delivery. A full queue drops the event and
// asks for a snapshot.
func (s *Server) queueEvent(ev controlplane.DeviceEvent) {
	select {
	case s.events <- ev:
	default:
		if !s.eventsLost.Swap(true) {
			s.metrics.eventsDropped.Inc()
			s.Resync()
		}
	}
}

// Resync asks the follow loop for a new snapshot: after a NATS
// reconnection, events may have been missed without a gap showing yet.
func (s *Server) Resync() {
	select {
	case s.resync <- struct{}{}:
	default:
	}
}

// follow keeps the replica up to date until the relay stops: it
// subscribes to device events if Start could not, takes a snapshot when
// the replica needs one (none yet, a gap in seq, a new epoch, dropped
// events, or Resync), and applies the events as they come, several per
// transaction. Each event also acts on the sessions held here (revoked,
// superseded), whether or not the replica could apply it.
func (s *Server) follow(watching, fresh bool) {
	wait := time.Duration(0)
	for !watching {
		wait = nextRetry(wait)
		if !sleep(s.ctx.Done(), wait) {
			return
		}
		if err := s.cp.Watch(s.ctx, s.queueEvent); err != nil {
			s.log.Debug("subscribe to device events", "err", err, "retry_in", nextRetry(wait))
			continue
		}
		watching = true
	}
	need, wait := !fresh, 0
	batch := make([]controlplane.DeviceEvent, 0, eventBatch)
	for {
		if need {
			if err := s.snapshot(s.ctx); err != nil {
				if s.ctx.Err() != nil {
					return
				}
				wait = nextRetry(wait)
				s.log.Warn("replica snapshot failed: serving from the replica as it is", "err", err, "retry_in", wait)
				select {
				case <-s.ctx.Done():
					return
				case <-s.resync:
				case <-time.After(wait):
				}
				continue
			}
			need, wait = false, 0
			s.replicaChanged(true)
		}
		batch = batch[:0]
		select {
		case <-s.ctx.Done():
			return
		case <-s.resync:
			need = true
			continue
		case ev := <-s.events:
			batch = append(batch, ev)
		}
		for more := true; more && len(batch) < eventBatch; {
			select {
			case ev := <-s.events:
				batch = append(batch, ev)
			default:
				more = false
			}
		}
		for _, ev := range batch {
			s.eventEffects(ev)
		}
		res, err := s.replica.Apply(batch...)
		if errors.Is(err, replica.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Error("apply device events to the replica", "err", err)
			need = true
			continue
		}
		s.metrics.events.Add(float64(res.Applied))
		need = res.NeedSnapshot || s.eventsLost.Swap(false)
		s.replicaChanged(false)
	}
}

// nextRetry doubles a retry delay from retryMin up to retryMax.
func nextRetry(d time.Duration) time.Duration { return min(max(2*d, retryMin), retryMax) }

// snapshot reads the control plane's whole state, page by page, into the
// replica, which swaps it in with the last page.
func (s *Server) snapshot(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	after := ""
	for {
		page, err := s.cp.Snapshot(ctx, controlplane.SnapshotRequest{After: after})
		if err != nil {
			return fmt.Errorf("snapshot page after %q: %w", after, err)
		}
		if err := s.replica.ApplySnapshot(page, after == ""); err != nil {
			return fmt.Errorf("apply snapshot page after %q: %w", after, err)
		}
		if after = page.Next; after == "" {
			s.metrics.snapshots.Inc()
			return nil
		}
	}
}

// eventEffects acts on the sessions held here for one device event: a
// revoked device is cut off, and a session superseded by a newer one
// elsewhere is closed.
func (s *Server) eventEffects(ev controlplane.DeviceEvent) {
	switch ev.Kind {
	case controlplane.EventSession, controlplane.EventOffline, controlplane.EventRelayDown:
		s.metrics.presenceUpdates.Inc()
	}
	if ev.Kind == controlplane.EventRelayDown && ev.RelayID != s.cfg.RelayID {
		s.forgetPeer(ev.RelayID) // restarted or silent: its session here is stale
	}
	sess := s.reg.session(ev.DeviceID)
	if sess == nil {
		return
	}
	switch ev.Kind {
	case controlplane.EventRevoked:
		s.log.Info("cutting off revoked device", "device", sess.name)
		sess.fail(frames.CodeRevoked, "device revoked by the operator")
	case controlplane.EventSession:
		// A newer session here replaced this one in the routing table
		// already; one on this relay with a higher generation is this
		// session renumbered by a sync.
		if gen := sess.generation(); ev.RelayID != s.cfg.RelayID && ev.Generation > gen {
			sess.fail(frames.CodeSuperseded, fmt.Sprintf("session %d superseded by session %d on relay %s", gen, ev.Generation, ev.RelayID))
		}
	}
}

// replicaChanged follows a change of the replica: the TCP listeners
// follow its leases, and after a snapshot (which may carry what events
// were lost) the sessions held here are checked against it.
func (s *Server) replicaChanged(snapshot bool) {
	s.tcp.reconcile()
	if !snapshot {
		return
	}
	for _, sess := range s.reg.all() {
		rec, ok := s.replica.Device(sess.deviceID)
		switch gen := sess.generation(); {
		case !ok:
		case rec.Revoked:
			sess.fail(frames.CodeRevoked, "device revoked by the operator")
		case rec.Online && rec.Relay != s.cfg.RelayID && rec.Generation > gen:
			sess.fail(frames.CodeSuperseded, fmt.Sprintf("session %d superseded by session %d on relay %s", gen, rec.Generation, rec.Relay))
		}
	}
}
