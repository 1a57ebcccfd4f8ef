package relay

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux/wsserver"
	"github.com/xtaci/smux"
)

// writeTimeout bounds every frame the relay writes to an agent.
const writeTimeout = 10 * time.Second

// session is one agent's live connection.
type session struct {
	srv    *Server
	log    *slog.Logger
	mux    *smux.Session
	ctrl   *smux.Stream
	remote string

	deviceID, name string
	gen            uint64
	heartbeat      time.Duration
	leases         []controlplane.Lease // as first registered

	wmu     sync.Mutex // serialises control-stream writes
	streams chan struct{}
	http    *http.Transport // pool of HTTP streams to this device

	closeOnce sync.Once
	closed    chan struct{}
}

// serveAgent runs one agent session for as long as it lives. The session's
// WebSocket is bound to r's context, so this handler returns only when the
// session is over.
func (s *Server) serveAgent(w http.ResponseWriter, r *http.Request) {
	if s.isDraining() {
		http.Error(w, "tether: relay is draining; connect to another relay", http.StatusServiceUnavailable)
		return
	}
	mux, err := wsserver.Accept(w, r, s.cfg.Mux)
	if err != nil {
		s.metrics.handshakes.WithLabelValues("protocol").Inc()
		s.log.Info("agent upgrade refused", "remote", r.RemoteAddr, "err", err)
		return
	}
	s.wg.Add(1)
	defer s.wg.Done()
	sess := &session{
		srv: s, mux: mux, remote: r.RemoteAddr,
		streams: make(chan struct{}, s.cfg.MaxStreamsPerSession),
		closed:  make(chan struct{}),
	}
	sess.log = s.log.With("remote", r.RemoteAddr)
	stop := context.AfterFunc(s.ctx, func() { sess.close() })
	defer stop()
	defer sess.close()

	leases, err := sess.handshake(r.Context())
	if err != nil {
		s.metrics.handshakes.WithLabelValues(handshakeResult(err)).Inc()
		sess.log.Info("agent handshake failed", "err", err)
		return
	}
	s.metrics.handshakes.WithLabelValues("ok").Inc()
	s.metrics.sessions.Inc()
	defer s.metrics.sessions.Dec()
	// Routable before the agent learns its names: a request made the moment
	// it does must find the session.
	s.reg.add(sess)
	if err = sess.write(leases); err == nil {
		sess.log.Info("agent connected", "generation", sess.gen, "services", len(sess.leases))
		err = sess.controlLoop()
	}
	s.reg.remove(sess)
	// A relay that shuts down reports all its sessions ended at once
	// (ResetRelay in Shutdown) instead of one request per session.
	if !s.isDraining() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if derr := s.cp.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: sess.deviceID, Generation: sess.gen}); derr != nil {
			sess.log.Warn("report disconnect to control plane", "err", derr)
		}
	}
	sess.log.Info("agent disconnected", "generation", sess.gen, "reason", err)
}

// handshakeError carries the code sent to the agent.
type handshakeError struct {
	code frames.ErrorCode
	err  error
}

func (e *handshakeError) Error() string { return e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

func handshakeResult(err error) string {
	var he *handshakeError
	if errors.As(err, &he) {
		return he.code.String()
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

// refuse sends an error frame to the agent and returns it as an error.
func (sess *session) refuse(code frames.ErrorCode, msg string) error {
	sess.write(&frames.Error{Code: code, Message: msg})
	return &handshakeError{code: code, err: errors.New(msg)}
}

func (sess *session) refuseCP(err error) error {
	code, ok := kindCodes[controlplane.KindOf(err)]
	if !ok {
		sess.log.Error("control plane failed during handshake", "err", err)
		return sess.refuse(frames.CodeInternal, "relay error; try again later")
	}
	return sess.refuse(code, err.Error())
}

// handshake authenticates the agent and registers its services; the
// caller sends the returned leases once the session is routable.
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
	ctrl.SetDeadline(deadline)
	hello, err := frames.ReadAs[*frames.Hello](ctrl, 0)
	if err != nil {
		return nil, sess.refuse(frames.CodeBadRequest, "expected hello: "+err.Error())
	}
	sess.heartbeat = time.Duration(hello.HeartbeatMillis) * time.Millisecond
	if sess.heartbeat < time.Second || sess.heartbeat > 10*time.Minute {
		return nil, sess.refuse(frames.CodeBadRequest, fmt.Sprintf("heartbeat interval %v is outside 1s..10m", sess.heartbeat))
	}
	ch := &frames.Challenge{RelayID: s.cfg.RelayID}
	rand.Read(ch.Nonce[:])
	if err := sess.write(ch); err != nil {
		return nil, err
	}
	auth, err := frames.ReadAs[*frames.Auth](ctrl, 0)
	if err != nil {
		return nil, sess.refuse(frames.CodeBadRequest, "expected auth: "+err.Error())
	}
	if !frames.VerifyAuth(hello.PublicKey, ch.Nonce, s.cfg.RelayID, auth.Signature) {
		return nil, sess.refuse(frames.CodeUnauthorized, "bad signature for device key "+frames.DeviceID(hello.PublicKey[:]))
	}
	cr, err := s.cp.Connect(ctx, controlplane.ConnectRequest{PublicKey: hello.PublicKey[:], RelayID: s.cfg.RelayID, AgentVersion: hello.AgentVersion})
	if err != nil {
		return nil, sess.refuseCP(err)
	}
	sess.deviceID, sess.name, sess.gen = cr.DeviceID, cr.Name, cr.Generation
	sess.log = sess.log.With("device", cr.Name, "device_id", cr.DeviceID)
	if err := sess.write(&frames.Welcome{DeviceID: cr.DeviceID, DeviceName: cr.Name, Generation: cr.Generation}); err != nil {
		return nil, err
	}
	reg, err := frames.ReadAs[*frames.Register](ctrl, 0)
	if err != nil {
		return nil, sess.refuse(frames.CodeBadRequest, "expected register: "+err.Error())
	}
	sess.http = s.newStreamTransport(sess)
	out, leases, err := sess.register(ctx, reg)
	if err != nil {
		return nil, err
	}
	sess.leases = leases
	ctrl.SetDeadline(time.Time{})
	return out, nil
}

// register records the agent's services with the control plane and
// returns their leases, as a frame for the agent and as the control
// plane's records. It sends nothing.
func (sess *session) register(ctx context.Context, reg *frames.Register) (*frames.Leases, []controlplane.Lease, error) {
	req := controlplane.RegisterRequest{DeviceID: sess.deviceID, Generation: sess.gen}
	for _, svc := range reg.Services {
		req.Services = append(req.Services, controlplane.Service{Name: svc.Name, Proto: svc.Proto})
	}
	leases, err := sess.srv.cp.Register(ctx, req)
	if err != nil {
		return nil, nil, sess.refuseCP(err)
	}
	out := &frames.Leases{}
	for _, l := range leases {
		fl := frames.Lease{Service: l.Service, Proto: l.Proto, Port: l.Port}
		if l.Hostname != "" {
			fl.Hostname = sess.srv.Hostname(l.Hostname)
		}
		out.Leases = append(out.Leases, fl)
	}
	return out, leases, nil
}

// write sends one control frame under a write deadline.
func (sess *session) write(m frames.Message) error {
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.ctrl == nil {
		return errors.New("no control stream")
	}
	return frames.WriteTimeout(sess.ctrl, m, writeTimeout)
}

// controlLoop serves the control stream until the session ends: it answers
// heartbeats and re-registrations and declares the agent dead after three
// silent heartbeat intervals.
func (sess *session) controlLoop() error {
	for {
		sess.ctrl.SetReadDeadline(time.Now().Add(3 * sess.heartbeat))
		m, err := frames.Read(sess.ctrl, 0)
		if err != nil {
			select {
			case <-sess.closed:
				return errors.New("closed by relay")
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				sess.srv.metrics.deadSessions.Inc()
				return fmt.Errorf("no heartbeat for %v", 3*sess.heartbeat)
			}
			if errors.Is(err, frames.ErrTooLarge) || errors.Is(err, frames.ErrShort) || errors.Is(err, frames.ErrInvalid) {
				sess.srv.metrics.protocolErrors.Inc()
				sess.refuse(frames.CodeBadRequest, err.Error())
			}
			return err
		}
		switch m := m.(type) {
		case *frames.Heartbeat:
			sess.srv.metrics.heartbeats.Inc()
			if err := sess.write(&frames.HeartbeatAck{Seq: m.Seq}); err != nil {
				return fmt.Errorf("answer heartbeat: %w", err)
			}
		case *frames.Register:
			ctx, cancel := context.WithTimeout(sess.srv.ctx, 10*time.Second)
			out, leases, err := sess.register(ctx, m)
			cancel()
			if err != nil {
				return err
			}
			sess.srv.reg.update(sess, leases)
			if err := sess.write(out); err != nil {
				return fmt.Errorf("send leases: %w", err)
			}
		case *frames.Error:
			return fmt.Errorf("agent closed the session: %w", m)
		case *frames.Unknown:
			// A newer agent's message: skip it.
		default:
			sess.srv.metrics.protocolErrors.Inc()
			return sess.refuse(frames.CodeBadRequest, fmt.Sprintf("unexpected %v frame", m.Type()))
		}
	}
}

// fail tells the agent why its session ends, then ends it.
func (sess *session) fail(code frames.ErrorCode, msg string) {
	go func() {
		sess.write(&frames.Error{Code: code, Message: msg})
		sess.close()
	}()
}

// drainAfter sends a drain notice after delay; the agent has within to move.
func (sess *session) drainAfter(ctx context.Context, delay, within time.Duration) {
	t := time.AfterFunc(delay, func() {
		sess.log.Info("asking agent to move", "within", within)
		sess.write(&frames.Drain{Reason: "relay is shutting down", WithinMillis: uint32(within / time.Millisecond)})
	})
	context.AfterFunc(ctx, func() { t.Stop() })
}

func (sess *session) close() {
	sess.closeOnce.Do(func() {
		close(sess.closed)
		sess.mux.Close()
		if sess.http != nil {
			sess.http.CloseIdleConnections()
		}
	})
}

// errTooManyStreams is returned when the session's stream cap is reached.
var errTooManyStreams = errors.New("too many concurrent connections to this device")

// openStream opens a data stream to a service of the agent and sends its
// header. The agent's answer is read lazily by the returned conn (so the
// first bytes can follow without waiting a round trip) or by awaitAnswer.
func (sess *session) openStream(service, client string) (*streamConn, error) {
	select {
	case sess.streams <- struct{}{}:
	default:
		sess.srv.metrics.streamsRefused.WithLabelValues("cap").Inc()
		return nil, errTooManyStreams
	}
	st, err := sess.mux.OpenStream()
	if err != nil {
		<-sess.streams
		return nil, fmt.Errorf("open stream to %s: %w", sess.name, err)
	}
	if err := frames.WriteTimeout(st, &frames.StreamOpen{Service: service, ClientAddr: client}, writeTimeout); err != nil {
		st.Close()
		<-sess.streams
		return nil, fmt.Errorf("open stream to %s: %w", sess.name, err)
	}
	sess.srv.metrics.streams.Inc()
	return &streamConn{Stream: st, sess: sess, service: service}, nil
}

// streamConn is a data stream whose first inbound frame is the agent's
// accept or refuse answer.
type streamConn struct {
	*smux.Stream
	sess    *session
	service string

	answerOnce sync.Once
	answerErr  error
	closeOnce  sync.Once
}

// RefusedError is a stream the agent refused.
type RefusedError struct {
	Device, Service string
	Refuse          *frames.StreamRefuse
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("device %s refused a connection to service %s: %s", e.Device, e.Service, e.Refuse)
}

// awaitAnswer reads the agent's answer once; it is nil when the agent accepted.
func (c *streamConn) awaitAnswer() error {
	c.answerOnce.Do(func() {
		c.Stream.SetReadDeadline(time.Now().Add(30 * time.Second))
		m, err := frames.Read(c.Stream, 4096)
		c.Stream.SetReadDeadline(time.Time{})
		switch m := m.(type) {
		case *frames.StreamAccept:
		case *frames.StreamRefuse:
			c.sess.srv.metrics.streamsRefused.WithLabelValues("agent").Inc()
			c.answerErr = &RefusedError{Device: c.sess.name, Service: c.service, Refuse: m}
		default:
			if err == nil {
				err = fmt.Errorf("unexpected %v frame", m.Type())
			}
			c.answerErr = fmt.Errorf("stream to %s/%s: no answer: %w", c.sess.name, c.service, err)
		}
	})
	return c.answerErr
}

func (c *streamConn) Read(b []byte) (int, error) {
	if err := c.awaitAnswer(); err != nil {
		return 0, err
	}
	return c.Stream.Read(b)
}

// WriteTo keeps io.Copy on the fast path without skipping the answer.
func (c *streamConn) WriteTo(w io.Writer) (int64, error) {
	if err := c.awaitAnswer(); err != nil {
		return 0, err
	}
	return c.Stream.WriteTo(w)
}

func (c *streamConn) Close() error {
	err := c.Stream.Close()
	c.closeOnce.Do(func() { <-c.sess.streams })
	return err
}
