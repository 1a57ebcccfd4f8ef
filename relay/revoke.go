package relay

import (
	"context"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

// revokeWait bounds the wait for a revoked device's session to close
// before the revocation is confirmed anyway (its agent is told, and the
// device is refused and no longer routed whatever its connection does).
const revokeWait = 3 * time.Second

// serveRevocations answers the control plane's revocation notices to this
// relay until it stops, subscribing again while NATS refuses.
func (s *Server) serveRevocations() {
	for wait := time.Duration(0); ; {
		err := s.cp.ServeRevocations(s.ctx, s.cfg.RelayID, s.applyRevocation)
		if err == nil {
			return // answered until s.ctx ends
		}
		wait = nextRetry(wait)
		s.log.Warn("cannot serve revocation notices yet", "err", err, "retry_in", wait)
		if !sleep(s.ctx.Done(), wait) {
			return
		}
	}
}

// applyRevocation cuts a device off here and returns once it is: it is
// refused at admission and not routed from now on, across restarts (the
// replica records the notice before anything else; it learns the revoked
// event as well), and its session here is closed. An error leaves the
// notice unconfirmed, so the control plane sends it again.
func (s *Server) applyRevocation(ctx context.Context, n controlplane.RevokeNotice) error {
	if err := s.replica.Revoke(n.DeviceID); err != nil {
		return err
	}
	s.metrics.revocations.Inc()
	sess := s.reg.session(n.DeviceID)
	if sess == nil {
		s.log.Info("revocation applied", "device_id", n.DeviceID, "session", false)
		return nil
	}
	sess.fail(frames.CodeRevoked, "device revoked by the operator")
	ctx, cancel := context.WithTimeout(ctx, revokeWait)
	defer cancel()
	select {
	case <-sess.closed:
	case <-ctx.Done():
		sess.close()
	}
	s.log.Info("revocation applied", "device", sess.name, "device_id", n.DeviceID, "session", true)
	return nil
}

// isRevoked reports whether a device is revoked: by a notice to this
// relay or an event, as the replica knows.
func (s *Server) isRevoked(deviceID string) bool {
	rec, ok := s.replica.Device(deviceID)
	return ok && rec.Revoked
}
