package relay

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

// helloLoop says hello to the control plane at once and then every
// HelloInterval until the relay stops. The answers tell the live peers and
// whether the replica missed events; the first answer after the control
// plane was away is followed by a sync of the sessions held here.
func (s *Server) helloLoop() {
	t := time.NewTicker(s.cfg.HelloInterval)
	defer t.Stop()
	for {
		s.hello()
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// hello sends one hello and acts on its answer.
func (s *Server) hello() {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.HelloInterval)
	defer cancel()
	resp, err := s.cp.Hello(ctx, controlplane.HelloRequest{
		RelayID: s.cfg.RelayID, ClusterAddr: s.cfg.ClusterAddr, PublicNames: s.cfg.PublicNames,
		ReservedLabels: s.ownLabels(), Sessions: s.Sessions(), UnboundPorts: s.tcp.unbound(),
		BusyPorts: s.probe.probe(s.tcp),
	})
	if err != nil {
		if s.ctx.Err() != nil {
			return
		}
		s.metrics.hellos.WithLabelValues("error").Inc()
		// Sessions may come and go unseen meanwhile: sync when it is back.
		s.needSync.Store(true)
		s.setReachable(false)
		if s.helloFails++; s.helloFails == 1 {
			s.log.Warn("control plane unreachable: serving from the replica", "err", err)
		}
		return
	}
	s.helloFails = 0
	s.metrics.hellos.WithLabelValues("ok").Inc()
	s.setPeers(resp.Relays)
	s.checkSeq(resp.Epoch, resp.Seq)
	if s.needSync.Load() {
		pending, err := s.syncSessions(ctx)
		if err != nil {
			s.metrics.syncs.WithLabelValues("error").Inc()
			s.log.Warn("sync the sessions held here with the control plane", "err", err)
			return // reachable only once synced: tried again at the next hello
		}
		s.metrics.syncs.WithLabelValues("ok").Inc()
		s.reregister(pending)
	}
	if s.setReachable(true) {
		s.log.Info("control plane reachable", "relays", len(resp.Relays))
	}
}

// setReachable records whether the control plane answers and reports a
// change.
func (s *Server) setReachable(up bool) (changed bool) {
	if s.reachable.Swap(up) == up {
		return false
	}
	s.metrics.cpReachable.Set(map[bool]float64{false: 0, true: 1}[up])
	return true
}

// cpTimeout bounds a handshake's request to the control plane: short
// while its hellos fail (the agent is admitted from the replica instead of
// waiting), the client's own otherwise.
func (s *Server) cpTimeout() time.Duration {
	if s.ControlPlaneReachable() {
		return 10 * time.Second
	}
	return time.Second
}

// ControlPlaneReachable reports whether the relay's last hello reached the
// control plane (and the sessions held here are synced with it).
func (s *Server) ControlPlaneReachable() bool { return s.reachable.Load() }

// checkSeq asks for a snapshot when the control plane's (epoch, seq) in a
// hello's answer shows that the replica missed events: another epoch (the
// control plane restarted), or a seq the replica is still below one
// hello later (events lost without a gap showing, as across a NATS
// reconnection).
func (s *Server) checkSeq(epoch string, seq uint64) {
	mine, applied := s.replica.Epoch()
	s.mu.Lock()
	behind := mine != epoch || epoch == s.helloEpoch && applied < s.helloSeq
	s.helloEpoch, s.helloSeq = epoch, seq
	s.mu.Unlock()
	if behind {
		s.log.Debug("the replica missed device events: a new snapshot", "epoch", epoch, "seq", seq, "replica_epoch", mine, "replica_seq", applied)
		s.Resync()
	}
}

// setPeers records the live relays of a hello's answer: their cluster
// addresses are where public connections are forwarded to.
func (s *Server) setPeers(relays []controlplane.RelayInfo) {
	peers := make(map[string]string, len(relays))
	for _, r := range relays {
		if r.ID != s.cfg.RelayID && r.ClusterAddr != "" {
			peers[r.ID] = r.ClusterAddr
		}
	}
	s.mu.Lock()
	old := s.peers
	s.peers = peers
	s.mu.Unlock()
	for id, addr := range old {
		if now, ok := peers[id]; !ok || now != addr {
			s.log.Info("peer relay left or moved", "peer", id, "addr", addr, "now", now)
			s.forgetPeer(id)
		}
	}
	for id, addr := range peers {
		if _, ok := old[id]; !ok {
			s.log.Info("peer relay joined", "peer", id, "addr", addr)
		}
	}
}

// Peers returns the live peer relays as the last hello's answer listed
// them (ID → cluster address).
func (s *Server) Peers() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.peers)
}

// syncSessions reports the sessions held here to the control plane, after
// it was away, and adopts its answer: each session it accepted takes the
// generation it now has; a session it left out (superseded elsewhere, or
// revoked) is closed. Handshakes and goodbyes wait meanwhile (syncMu), so
// the list it sends is the truth. It returns the registrations of
// accepted sessions that the control plane has not seen yet.
func (s *Server) syncSessions(ctx context.Context) (map[*session]*frames.Register, error) {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	sessions := s.reg.all()
	req := controlplane.SyncRequest{RelayID: s.cfg.RelayID, Sessions: make([]controlplane.SyncSession, 0, len(sessions))}
	for _, sess := range sessions {
		req.Sessions = append(req.Sessions, controlplane.SyncSession{DeviceID: sess.deviceID, Generation: sess.generation()})
	}
	s.needSync.Store(false) // a failure from here on sets it again
	resp, err := s.cp.Sync(ctx, req)
	if err != nil {
		s.needSync.Store(true)
		return nil, fmt.Errorf("sync %d sessions: %w", len(req.Sessions), err)
	}
	accepted := make(map[string]uint64, len(resp.Sessions))
	for _, a := range resp.Sessions {
		accepted[a.DeviceID] = a.Generation
	}
	var closed int
	pending := map[*session]*frames.Register{}
	for _, sess := range sessions {
		gen, ok := accepted[sess.deviceID]
		if !ok {
			closed++
			sess.fail(frames.CodeSuperseded, "the control plane did not accept this session after its outage: the device connected elsewhere since, or was revoked")
			continue
		}
		if old := sess.generation(); old != gen {
			sess.gen.Store(gen)
			sess.log.Info("session renumbered by the control plane", "generation", gen, "was", old)
		}
		if reg := sess.synced(); reg != nil {
			pending[sess] = reg
		}
	}
	s.log.Info("sessions synced with the control plane", "held", len(sessions), "accepted", len(accepted), "closed", closed, "to_register", len(pending))
	return pending, nil
}

// reregisterConcurrency bounds the registrations made at once after a sync.
const reregisterConcurrency = 16

// reregister makes the registrations the control plane did not see while
// it was away, a few at a time, and tells each agent its leases.
func (s *Server) reregister(pending map[*session]*frames.Register) {
	sem := make(chan struct{}, reregisterConcurrency)
	var wg sync.WaitGroup
	for sess, reg := range pending {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
			defer cancel()
			sess.reregister(ctx, reg)
		})
	}
	wg.Wait()
}
