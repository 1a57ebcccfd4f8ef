package relay

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux/wsserver"
	"github.com/xtaci/smux"
)

// writeTimeout bounds every frame the relay writes to an agent.
const writeTimeout = 10 * time.Second

// An agent registers its services once per session, and again when they
// change: more than registerBurst registrations within registerWindow
// end the session (each one is a write on the control plane).
const (
	registerBurst  = 30
	registerWindow = 10 * time.Second
)

// controlQueueLen bounds the control frames waiting for a session's
// writer. A healthy agent reads them at once: a heartbeat ack per
// heartbeat, now and then new leases, one drain notice, one error.
const controlQueueLen = 16

// session is one agent's live connection.
//
// Its control stream has one writer, sendLoop, fed by a bounded queue
// (send, fail): whoever has something to tell the agent (the control loop,
// a newer session, a revocation, a draining relay) queues it and never
// blocks. The control loop is the one reader.
type session struct {
	srv    *Server
	log    *slog.Logger
	mux    *smux.Session
	ctrl   *smux.Stream
	remote string

	deviceID, name string
	gen            atomic.Uint64 // the control plane's generation; Sync may renumber it
	heartbeat      time.Duration
	leases         []controlplane.Lease // as first registered
	// tcpIdle maps a tcp service to the idle timeout its agent asked
	// for (setTCPIdle, at each registration).
	tcpIdle atomic.Pointer[map[string]time.Duration]

	out        chan outFrame  // control frames for sendLoop
	writer     sync.WaitGroup // sendLoop
	writerOnce sync.Once      // startWriter
	streams    chan struct{}  // one token per open data stream

	pmu     sync.Mutex
	proxies map[string]*serviceProxy // service → its HTTP proxy, built on first use

	closeOnce sync.Once
	closed    chan struct{}

	holdingSync bool // the handshake holds srv.syncMu (read)

	upd sessionUpdates // agent updates (update.go)

	regBurst    int              // registrations since regSince (the control loop's own)
	regSince    time.Time        // start of the current registration window
	regMu       sync.Mutex       // one registration at a time; guards the two below
	provisional bool             // admitted from the replica, not yet synced
	pending     *frames.Register // a registration the control plane has not seen yet
}

// knownLeases returns the leases the replica knows for the services of reg.
func (sess *session) knownLeases(reg *frames.Register) []controlplane.Lease {
	rec, _ := sess.srv.replica.Device(sess.deviceID)
	var out []controlplane.Lease
	for _, svc := range reg.Services {
		for _, l := range rec.Leases {
			if l.Service == svc.Name && l.Proto == svc.Proto {
				out = append(out, l)
			}
		}
	}
	return out
}

// synced marks the session as known to the control plane after a sync,
// and returns the registration it has not seen, if any.
func (sess *session) synced() *frames.Register {
	sess.regMu.Lock()
	defer sess.regMu.Unlock()
	sess.provisional = false
	return sess.pending
}

// reregister makes the registration the control plane has not seen, now
// that it answers, and sends the agent its leases (new services get
// theirs).
func (sess *session) reregister(ctx context.Context, reg *frames.Register) {
	out, leases, err := sess.register(ctx, reg)
	if err != nil {
		sess.log.Warn("register services after the control plane returned", "err", err)
		var se *sessionError
		if errors.As(err, &se) {
			sess.fail(se.code, se.msg)
		}
		return
	}
	sess.srv.tcp.sync(sess.srv.reg.update(sess, leases))
	sess.send(out)
}

// holdSync makes a sync of the relay's sessions wait until releaseSync:
// from the session's connect to its routing, the control plane and the
// routing table disagree about it.
func (sess *session) holdSync() {
	sess.srv.syncMu.RLock()
	sess.holdingSync = true
}

func (sess *session) releaseSync() {
	if sess.holdingSync {
		sess.holdingSync = false
		sess.srv.syncMu.RUnlock()
	}
}

// outFrame is a control frame queued for the writer.
type outFrame struct {
	m    frames.Message
	last bool // the writer closes the session once m is written
}

// serveAgent upgrades an agent's request to a session and serves the
// session from a goroutine of its own, for as long as it lives. The
// handler returns at once: the goroutine that read the request, its stack
// grown by the TLS handshake (about 15 KiB), and the request are freed,
// which is a third of what an agent's connection costs the relay before
// its key is verified.
func (s *Server) serveAgent(w http.ResponseWriter, r *http.Request) {
	done, ok := s.track()
	if !ok {
		http.Error(w, "tether: relay is draining; connect to another relay", http.StatusServiceUnavailable)
		return
	}
	release, ok := s.admitHandshake(w, r)
	if !ok {
		done()
		return
	}
	mux, err := wsserver.Accept(w, r, s.cfg.Mux)
	if err != nil {
		release()
		done()
		s.metrics.handshakes.WithLabelValues("protocol").Inc()
		s.log.Debug("agent upgrade refused", "remote", r.RemoteAddr, "err", err)
		s.limits.upgradeRefusals.note(clientKey(r.RemoteAddr).String(), "agent upgrades refused", "err", err) // one line per 10s (ratelimit.go)
		return
	}
	ctx, remote := context.WithoutCancel(r.Context()), r.RemoteAddr
	go func() {
		defer done()
		defer release()
		s.runSession(ctx, mux, remote, release)
	}()
}

// runSession serves one agent's smux session until it ends: handshake,
// routing, control loop, goodbye. ctx bounds the handshake's requests to
// the control plane; the relay's own shutdown closes the session.
// endHandshake is called once the handshake is over, either way.
func (s *Server) runSession(ctx context.Context, mux *smux.Session, remote string, endHandshake func()) {
	sess := &session{
		srv: s, mux: mux, remote: remote, log: s.log.With("remote", remote),
		out:     make(chan outFrame, controlQueueLen),
		streams: make(chan struct{}, s.cfg.MaxStreamsPerSession),
		proxies: map[string]*serviceProxy{},
		closed:  make(chan struct{}),
	}
	stop := context.AfterFunc(s.ctx, sess.close)
	defer stop()

	leases, err := sess.handshake(ctx)
	endHandshake()
	if err != nil {
		sess.releaseSync()
		s.metrics.handshakes.WithLabelValues(handshakeResult(err)).Inc()
		sess.log.Debug("agent handshake failed", "err", err)
		s.limits.handshakeFailures.note(clientKey(remote).String(), "agent handshakes failed", "err", err) // one line per 10s (ratelimit.go)
		if sess.deviceID != "" {
			s.goodbye(sess) // connected, then failed: nothing may count it online
		}
		sess.end(err)
		return
	}
	s.metrics.handshakes.WithLabelValues("ok").Inc()
	s.metrics.sessions.Inc()
	// Routable before the agent learns its names: a request made the moment
	// it does must find the session.
	err = s.admit(sess)
	sess.releaseSync()
	if err == nil {
		sess.send(leases)
		sess.log.Info("agent connected", "generation", sess.generation(), "services", len(sess.leases))
		sess.startUpdates()
		err = sess.controlLoop()
	}
	s.goodbye(sess)
	sess.end(err)
	sess.waitUpdates()
	s.metrics.sessions.Dec()
	sess.log.Info("agent disconnected", "generation", sess.generation(), "reason", err)
}

// goodbye takes a session out of the routing table and tells the control
// plane, unless the relay is shutting down: then it reports all its
// sessions ended at once (ResetRelay in Shutdown). A sync waits for it.
func (s *Server) goodbye(sess *session) {
	s.syncMu.RLock()
	defer s.syncMu.RUnlock()
	s.forget(sess)
	if s.isDraining() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.cp.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: sess.deviceID, Generation: sess.generation()}); err != nil {
		sess.log.Warn("report disconnect to control plane", "err", err)
		if controlplane.KindOf(err) == controlplane.KindUnavailable {
			s.needSync.Store(true)
		}
	}
}

// admit puts sess in the routing table, fails the session it supersedes
// (or sess itself, if a newer one is live) and binds its TCP ports.
func (s *Server) admit(sess *session) error {
	loser, ports := s.reg.add(sess)
	if loser == sess {
		return refuse(frames.CodeSuperseded, "a newer session of this device is live")
	}
	if loser != nil {
		loser.fail(frames.CodeSuperseded, "superseded by a newer session of this device")
	}
	s.tcp.sync(ports)
	return nil
}

// forget takes sess out of the routing table, unless a newer session
// replaced it, and unbinds its TCP ports.
func (s *Server) forget(sess *session) {
	s.tcp.sync(s.reg.remove(sess))
}

// sessionError ends a session with a code the agent is told.
type sessionError struct {
	code frames.ErrorCode
	msg  string
}

func (e *sessionError) Error() string { return e.msg }

func handshakeResult(err error) string {
	var se *sessionError
	if errors.As(err, &se) {
		return se.code.String()
	}
	return "io"
}

var kindCodes = map[controlplane.Kind]frames.ErrorCode{
	controlplane.KindUnauthorized: frames.CodeUnauthorized,
	controlplane.KindNotFound:     frames.CodeUnauthorized,
	controlplane.KindRevoked:      frames.CodeRevoked,
	controlplane.KindConflict:     frames.CodeConflict,
	controlplane.KindUnavailable:  frames.CodeUnavailable,
	controlplane.KindInvalid:      frames.CodeBadRequest,
}

// refuse returns the error that ends a session with code; end sends it.
func refuse(code frames.ErrorCode, msg string) error {
	return &sessionError{code: code, msg: msg}
}

func (sess *session) refuseCP(err error) error {
	code, ok := kindCodes[controlplane.KindOf(err)]
	if !ok {
		sess.log.Error("control plane failed during handshake", "err", err)
		return refuse(frames.CodeInternal, "relay error; try again later")
	}
	return refuse(code, err.Error())
}

// handshake accepts the control stream, starts its writer, authenticates
// the agent and registers its services; the caller sends the returned
// leases once the session is routable.
func (sess *session) handshake(ctx context.Context) (*frames.Leases, error) {
	s := sess.srv
	deadline := time.Now().Add(s.cfg.HandshakeTimeout)
	sess.mux.SetDeadline(deadline)
	ctrl, err := sess.mux.AcceptStream()
	if err != nil {
		return nil, fmt.Errorf("accept control stream: %w", err)
	}
	sess.mux.SetDeadline(time.Time{})
	sess.ctrl = ctrl
	ctrl.SetReadDeadline(deadline)
	// Until the key is verified, the session costs the relay as little as
	// it can: a small window (wsmux.Config.PreAuthWindow), small frames, no
	// writer goroutine (the challenge is written here).
	hello, err := frames.ReadAs[*frames.Hello](ctrl, frames.MaxPreAuthPayload)
	if err != nil {
		return nil, refuse(frames.CodeBadRequest, "expected hello: "+err.Error())
	}
	sess.heartbeat = time.Duration(hello.HeartbeatMillis) * time.Millisecond
	if sess.heartbeat > 0 { // zero: refused below
		sess.heartbeat = min(max(sess.heartbeat, s.cfg.HeartbeatMin), s.cfg.HeartbeatMax)
	}
	sess.upd.agentVersion = hello.AgentVersion
	if sess.heartbeat == 0 {
		return nil, refuse(frames.CodeBadRequest, "hello without a heartbeat interval")
	}
	ch := &frames.Challenge{RelayID: s.cfg.RelayID}
	rand.Read(ch.Nonce[:])
	if err := frames.WriteTimeout(ctrl, ch, writeTimeout); err != nil {
		return nil, fmt.Errorf("write challenge: %w", err)
	}
	auth, err := frames.ReadAs[*frames.Auth](ctrl, frames.MaxPreAuthPayload)
	if err != nil {
		return nil, refuse(frames.CodeBadRequest, "expected auth: "+err.Error())
	}
	if !frames.VerifyAuth(hello.PublicKey, ch.Nonce, s.cfg.RelayID, auth.Signature) {
		return nil, refuse(frames.CodeUnauthorized, "bad signature for device key "+frames.DeviceID(hello.PublicKey[:]))
	}
	// The control plane checks the signature again: relay credentials alone
	// do not open a session. From here until the session is routed, a sync
	// of the sessions held here waits.
	sess.holdSync()
	cctx, cancel := context.WithTimeout(ctx, s.cpTimeout())
	cr, err := s.cp.Connect(cctx, controlplane.ConnectRequest{PublicKey: hello.PublicKey[:], RelayID: s.cfg.RelayID,
		AgentVersion: hello.AgentVersion, Nonce: ch.Nonce, Signature: auth.Signature})
	cancel()
	if controlplane.KindOf(err) == controlplane.KindUnavailable {
		cr, err = sess.admitFromReplica(hello.PublicKey[:], err)
	} else if err == nil {
		s.metrics.admissions.WithLabelValues("control_plane").Inc()
	}
	if err != nil {
		return nil, sess.refuseCP(err)
	}
	sess.deviceID, sess.name = cr.DeviceID, cr.Name
	sess.gen.Store(cr.Generation)
	if s.isRevoked(cr.DeviceID) {
		return nil, refuse(frames.CodeRevoked, "device "+cr.Name+" was revoked")
	}
	sess.log = sess.log.With("device", cr.Name, "device_id", cr.DeviceID)
	s.cfg.Mux.Trust(sess.mux) // the key is verified: the session gets its whole window
	sess.startWriter()
	sess.send(&frames.Welcome{DeviceID: cr.DeviceID, DeviceName: cr.Name, Generation: cr.Generation,
		HeartbeatMillis: uint32(sess.heartbeat / time.Millisecond)})
	reg, err := frames.ReadAs[*frames.Register](ctrl, 0)
	if err != nil {
		return nil, refuse(frames.CodeBadRequest, "expected register: "+err.Error())
	}
	out, leases, err := sess.register(ctx, reg)
	if err != nil {
		return nil, err
	}
	sess.leases = leases
	ctrl.SetReadDeadline(time.Time{})
	return out, nil
}

// admitFromReplica authenticates a device while the control plane is
// away (cpErr says why): the replica knows its key and it is not revoked.
// The session gets a provisional generation, the one above the newest the
// relay has seen, and the names the replica knows; the control plane
// learns of it when the sessions are synced.
func (sess *session) admitFromReplica(pub []byte, cpErr error) (controlplane.ConnectResponse, error) {
	s := sess.srv
	rec, gen, err := s.replica.Admit(pub)
	if err != nil {
		if kind := controlplane.KindOf(err); kind == controlplane.KindUnauthorized || kind == controlplane.KindRevoked {
			return controlplane.ConnectResponse{}, controlplane.Errorf(kind, "the control plane is unreachable and %v", err)
		}
		return controlplane.ConnectResponse{}, fmt.Errorf("admit from the replica (control plane unreachable: %w): %w", cpErr, err)
	}
	sess.regMu.Lock()
	sess.provisional = true
	sess.regMu.Unlock()
	s.needSync.Store(true)
	s.metrics.admissions.WithLabelValues("replica").Inc()
	sess.log.Info("control plane unreachable: device admitted from the replica", "device", rec.Name, "device_id", rec.ID, "generation", gen, "err", cpErr)
	return controlplane.ConnectResponse{DeviceID: rec.ID, Name: rec.Name, Generation: gen}, nil
}

// register records the agent's services with the control plane and
// returns their leases, as a frame for the agent and as the control
// plane's records. It sends nothing. While the control plane is away (or
// has not accepted the session yet: it was admitted from the replica),
// the services get the leases the replica knows for them, new services
// none, and the registration is made once the sessions are synced.
func (sess *session) register(ctx context.Context, reg *frames.Register) (*frames.Leases, []controlplane.Lease, error) {
	sess.regMu.Lock()
	defer sess.regMu.Unlock()
	var leases []controlplane.Lease
	var err error = controlplane.Errorf(controlplane.KindUnavailable, "session not synced with the control plane yet")
	if !sess.provisional {
		req := controlplane.RegisterRequest{DeviceID: sess.deviceID, Generation: sess.generation()}
		for _, svc := range reg.Services {
			req.Services = append(req.Services, controlplane.Service{Name: svc.Name, Proto: svc.Proto})
		}
		rctx, cancel := context.WithTimeout(ctx, sess.srv.cpTimeout())
		leases, err = sess.srv.cp.Register(rctx, req)
		cancel()
		if err != nil && controlplane.KindOf(err) != controlplane.KindUnavailable {
			return nil, nil, sess.refuseCP(err)
		}
	}
	sess.pending = nil
	if err != nil {
		leases = sess.knownLeases(reg)
		sess.pending = reg
		sess.srv.needSync.Store(true)
		sess.log.Info("services registered with the leases the replica knows; the control plane is told once it answers",
			"services", len(reg.Services), "leased", len(leases), "err", err)
	}
	out := &frames.Leases{}
	for _, l := range leases {
		fl := frames.Lease{Service: l.Service, Proto: l.Proto, Port: l.Port}
		if l.Hostname != "" {
			fl.Hostname = sess.srv.Hostname(l.Hostname)
		}
		out.Leases = append(out.Leases, fl)
	}
	sess.setTCPIdle(reg)
	return out, leases, nil
}

// controlLoop serves the control stream until the session ends: it answers
// heartbeats and re-registrations and declares the agent dead after three
// silent heartbeat intervals. An error with a code is for end to send.
func (sess *session) controlLoop() error {
	m := sess.srv.metrics
	for {
		sess.ctrl.SetReadDeadline(time.Now().Add(3 * sess.heartbeat))
		msg, err := frames.Read(sess.ctrl, 0)
		if err != nil {
			if sess.isClosed() {
				return errors.New("closed by relay")
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				m.deadSessions.Inc()
				return fmt.Errorf("no heartbeat for %v", 3*sess.heartbeat)
			}
			if errors.Is(err, frames.ErrTooLarge) || errors.Is(err, frames.ErrShort) || errors.Is(err, frames.ErrInvalid) {
				m.protocolErrors.Inc()
				return refuse(frames.CodeBadRequest, err.Error())
			}
			return fmt.Errorf("read control stream: %w", err)
		}
		switch msg := msg.(type) {
		case *frames.Heartbeat:
			m.heartbeats.Inc()
			sess.send(&frames.HeartbeatAck{Seq: msg.Seq})
		case *frames.Register:
			if now := time.Now(); now.Sub(sess.regSince) > registerWindow {
				sess.regSince, sess.regBurst = now, 0
			}
			if sess.regBurst++; sess.regBurst > registerBurst {
				m.protocolErrors.Inc()
				return refuse(frames.CodeBadRequest, fmt.Sprintf("more than %d registrations within %v", registerBurst, registerWindow))
			}
			ctx, cancel := context.WithTimeout(sess.srv.ctx, 10*time.Second)
			out, leases, err := sess.register(ctx, msg)
			cancel()
			if err != nil {
				return err
			}
			sess.srv.tcp.sync(sess.srv.reg.update(sess, leases))
			sess.send(out)
		case *frames.UpdateStatus:
			sess.updateStatus(msg)
		case *frames.Error:
			return fmt.Errorf("agent closed the session: %w", msg)
		case *frames.Unknown:
			// A newer agent's message: skip it.
		default:
			m.protocolErrors.Inc()
			return refuse(frames.CodeBadRequest, fmt.Sprintf("unexpected %v frame", msg.Type()))
		}
	}
}

// send queues a control frame for the writer; it never blocks. A full
// queue means the agent stopped reading its control stream (it cannot even
// take a heartbeat ack): the session is dead, so it is closed and counted.
func (sess *session) send(m frames.Message) { sess.enqueue(outFrame{m: m}) }

// fail tells the agent why its session ends, then ends it: the writer
// sends the error frame after those already queued and closes the session.
// It never blocks, so it may be called from anywhere.
func (sess *session) fail(code frames.ErrorCode, msg string) {
	sess.enqueue(outFrame{m: &frames.Error{Code: code, Message: msg}, last: true})
}

func (sess *session) enqueue(f outFrame) {
	if sess.isClosed() {
		sess.close() // the connection may have died under us: stop the writer too
		return
	}
	select {
	case sess.out <- f:
	default:
		sess.srv.metrics.controlQueueFull.Inc()
		sess.log.Warn("control queue full: the agent does not read its control stream; closing the session", "queued", controlQueueLen)
		sess.close()
	}
}

// startWriter starts sendLoop, once: after the handshake wrote the
// challenge itself, when the agent is authenticated or refused.
func (sess *session) startWriter() {
	sess.writerOnce.Do(func() { sess.writer.Go(sess.sendLoop) })
}

// sendLoop is the control stream's one writer: it writes the queued frames
// in order, each under writeTimeout, until the session closes or a frame
// marked last is written. A failed write closes the session.
func (sess *session) sendLoop() {
	for {
		select {
		case <-sess.closed:
			return
		case f := <-sess.out:
			if err := frames.WriteTimeout(sess.ctrl, f.m, writeTimeout); err != nil {
				// Not sess.log: the handshake may still be adding to it.
				sess.srv.log.Debug("write control frame", "remote", sess.remote, "type", f.m.Type(), "err", err)
				sess.close()
				return
			}
			if f.last {
				sess.close()
				return
			}
		}
	}
}

// end closes the session and waits for its writer. An error with a code
// is sent to the agent first, behind the frames already queued.
func (sess *session) end(err error) {
	var se *sessionError
	if errors.As(err, &se) && sess.ctrl != nil {
		sess.startWriter() // a handshake refused before the key was verified has none yet
		sess.fail(se.code, se.msg)
	} else {
		sess.close()
	}
	sess.writer.Wait()
}

func (sess *session) close() {
	sess.closeOnce.Do(func() {
		close(sess.closed)
		sess.mux.Close()
		sess.pmu.Lock()
		defer sess.pmu.Unlock()
		for _, p := range sess.proxies {
			p.transport.CloseIdleConnections()
		}
	})
}

// generation is the session's generation.
func (sess *session) generation() uint64 { return sess.gen.Load() }

// isClosed reports whether the session has ended, by the relay's hand or
// the connection's.
func (sess *session) isClosed() bool {
	select {
	case <-sess.closed:
		return true
	default:
		return sess.mux.IsClosed()
	}
}

// proxy returns the reverse proxy to one of the session's services,
// building it on first use.
func (sess *session) proxy(service string) *serviceProxy {
	sess.pmu.Lock()
	defer sess.pmu.Unlock()
	p, ok := sess.proxies[service]
	if !ok {
		p = sess.srv.newServiceProxy(upstream{device: sess.name, service: service, gone: sess.isClosed,
			dial: func(ctx context.Context) (net.Conn, error) { return sess.dialHTTP(ctx, service) }})
		sess.proxies[service] = p
	}
	return p
}
