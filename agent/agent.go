package agent

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/agent/update"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/splice"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/xtaci/smux"
)

// Errors that end Run: retrying would not help.
var (
	// ErrRevoked means the operator revoked the device.
	ErrRevoked = errors.New("device revoked by the operator: it will not reconnect (enroll it again with a new key to bring it back)")
	// ErrUnauthorized means the relay does not know the device key.
	ErrUnauthorized = errors.New("device key refused by the relay")
)

// writeTimeout bounds every frame the agent writes.
const writeTimeout = 10 * time.Second

// Agent is a device agent.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	services map[string]Service

	active atomic.Int32  // data streams open now
	total  atomic.Uint64 // data streams served
	wg     sync.WaitGroup

	// Updates (update.go).
	cur         atomic.Pointer[conn] // the session being served, for downloads and reports
	updating    atomic.Bool          // an update is being downloaded or swapped in
	appliedSent atomic.Bool          // this new version said it was applied
	healthy     chan struct{}        // closed once a pending new version is healthy
	healthyOnce sync.Once
	restart     context.CancelCauseFunc // ends Run with update.ErrRestart
}

// New validates cfg and returns an agent.
func New(cfg Config) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, services: map[string]Service{}, healthy: make(chan struct{})}
	for _, s := range cfg.Services {
		a.services[s.Name] = s
	}
	return a, nil
}

// Run enrolls the device if needed, then keeps a session to a relay until
// ctx ends (returning nil) or the device is refused for good (ErrRevoked,
// ErrUnauthorized, *EnrollError, ErrNotEnrolled) or its binary was replaced
// (update.ErrRestart: the caller re-executes it). Network failures, also at
// boot before the network is up, are retried for ever with backoff.
func (a *Agent) Run(ctx context.Context) (err error) {
	ctx, a.restart = context.WithCancelCause(ctx)
	defer func() {
		a.wg.Wait()
		if cause := context.Cause(ctx); errors.Is(cause, update.ErrRestart) {
			err = cause
		}
	}()
	a.watch(ctx)
	for _, s := range a.cfg.Services {
		if frames.LegacyServiceName(s.Name) {
			a.log.Warn("service name with '-': it keeps the hostname it holds, but a relay gives such a name no new one; rename it (no '-')", "service", s.Name)
		}
	}
	for _, u := range a.cfg.RelayURLs {
		if strings.HasPrefix(u, "ws://") {
			a.log.Warn("INSECURE: relay URL without TLS; the enrollment token and the session travel in cleartext (TETHER_INSECURE)", "relay", u)
		}
	}
	id, err := a.loadIdentity(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	a.log.Info("agent starting", "device", id.Name, "device_id", id.DeviceID, "relays", a.cfg.RelayURLs)
	bo := a.newBackoff()
	var old *conn // a draining session kept until its successor is up
	defer func() {
		if old != nil {
			old.close() // on every exit, or wg.Wait would wait for its streams
		}
	}()
	for attempt := 0; ctx.Err() == nil; attempt++ {
		url := a.cfg.RelayURLs[attempt%len(a.cfg.RelayURLs)]
		c, err := a.connect(ctx, id, url)
		if old != nil && (err == nil || ctx.Err() != nil) {
			old.close() // make before break: the new session is up
			old = nil
		}
		if err == nil {
			bo.reset()
			err = c.serve(ctx)
			var drain *drainError
			if errors.As(err, &drain) {
				old = c // old is nil here: the successful connect closed it
				a.log.Info("relay asked us to move", "relay", url, "reason", drain.Reason)
				if err := sleepCtx(ctx, drain.wait()); err != nil {
					break
				}
				continue
			}
			c.close()
		}
		if ctx.Err() != nil {
			break
		}
		switch {
		case errors.Is(err, ErrRevoked):
			a.log.Error("device revoked: stopping", "device", id.Name)
			return ErrRevoked
		case errors.Is(err, ErrUnauthorized):
			a.log.Error("relay refused the device key: stopping", "device", id.Name, "err", err)
			return err
		}
		wait := bo.next()
		a.log.Warn("relay session ended; reconnecting", "relay", url, "err", err, "retry_in", wait)
		if err := sleepCtx(ctx, wait); err != nil {
			break
		}
	}
	return nil
}

func (a *Agent) dialOptions() wsmux.DialOptions {
	return wsmux.DialOptions{
		TLS:         &tls.Config{RootCAs: a.cfg.RootCAs, MinVersion: tls.VersionTLS12},
		Proxy:       a.cfg.Proxy,
		DialContext: a.cfg.DialContext,
		Mux:         a.cfg.Mux,
	}
}

// conn is one session to a relay.
type conn struct {
	a     *Agent
	relay string
	mux   *smux.Session
	ctrl  *smux.Stream
	wmu   sync.Mutex
	once  sync.Once
	// heartbeat is the interval the relay holds this session to (its
	// welcome), else the configured one.
	heartbeat time.Duration
}

// interval is the session's heartbeat interval.
func (c *conn) interval() time.Duration { return cmp.Or(c.heartbeat, c.a.cfg.HeartbeatInterval) }

// drainError ends serve when the relay asks the agent to move.
type drainError struct{ *frames.Drain }

func (d *drainError) Error() string { return "drain: " + d.Reason }

// wait picks a random moment within the relay's window to reconnect.
func (d *drainError) wait() time.Duration {
	w := time.Duration(d.WithinMillis) * time.Millisecond / 2
	if w <= 0 {
		return 0
	}
	return (&backoff{base: w, max: w}).next()
}

// connect dials a relay and runs the handshake: hello, challenge, signed
// auth, welcome, register, leases.
func (a *Agent) connect(ctx context.Context, id *identity, url string) (*conn, error) {
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	mux, err := wsmux.Dial(dctx, url, a.dialOptions())
	if err != nil {
		var he *wsmux.HandshakeError
		if errors.As(err, &he) && he.Status == 426 {
			return nil, fmt.Errorf("relay %s speaks another protocol version than this agent (%s): upgrade the agent", url, frames.Subprotocol)
		}
		return nil, err
	}
	c := &conn{a: a, relay: url, mux: mux}
	// A relay that stalls the handshake must not delay shutdown: the
	// deadlines on the control stream do not watch ctx.
	stop := context.AfterFunc(dctx, c.close)
	err = c.handshake(dctx, id)
	if !stop() || err != nil {
		c.close()
		return nil, cmp.Or(err, dctx.Err())
	}
	return c, nil
}

func (c *conn) handshake(ctx context.Context, id *identity) error {
	ctrl, err := c.mux.OpenStream()
	if err != nil {
		return fmt.Errorf("open control stream: %w", err)
	}
	c.ctrl = ctrl
	deadline, _ := ctx.Deadline()
	ctrl.SetDeadline(deadline)
	defer ctrl.SetDeadline(time.Time{})
	hb := uint32(c.a.cfg.HeartbeatInterval / time.Millisecond)
	if err := c.write(&frames.Hello{PublicKey: id.pub, AgentVersion: c.a.cfg.Version, HeartbeatMillis: hb}); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	ch, err := readAs[*frames.Challenge](ctrl)
	if err != nil {
		return fmt.Errorf("read challenge: %w", err)
	}
	auth := &frames.Auth{}
	copy(auth.Signature[:], ed25519.Sign(id.key, frames.AuthMessage(ch.Nonce, id.pub, ch.RelayID)))
	if err := c.write(auth); err != nil {
		return fmt.Errorf("send auth: %w", err)
	}
	w, err := readAs[*frames.Welcome](ctrl)
	if err != nil {
		return fmt.Errorf("read welcome: %w", err)
	}
	c.heartbeat = c.a.cfg.HeartbeatInterval
	if hb := time.Duration(w.HeartbeatMillis) * time.Millisecond; hb > 0 {
		if hb != c.heartbeat {
			c.a.log.Info("relay sets the heartbeat interval", "relay", c.relay, "asked", c.heartbeat, "interval", hb)
		}
		c.heartbeat = hb // the relay's bounds (from one not older than the field)
	}
	reg := &frames.Register{}
	for _, s := range c.a.cfg.Services {
		reg.Services = append(reg.Services, frames.Service{Name: s.Name, Proto: s.Proto, IdleSeconds: uint32(s.IdleTimeout / time.Second)})
	}
	if err := c.write(reg); err != nil {
		return fmt.Errorf("send register: %w", err)
	}
	ls, err := readAs[*frames.Leases](ctrl)
	if err != nil {
		return fmt.Errorf("read leases: %w", err)
	}
	attrs := []any{"relay", c.relay, "device", w.DeviceName, "generation", w.Generation}
	for _, l := range ls.Leases {
		if l.Hostname != "" {
			attrs = append(attrs, l.Service, l.Hostname)
		} else {
			attrs = append(attrs, l.Service, fmt.Sprintf("port %d", l.Port))
		}
	}
	c.a.log.Info("connected to relay", attrs...)
	if c.a.cfg.OnLeases != nil {
		c.a.cfg.OnLeases(ls.Leases)
	}
	return nil
}

// readAs reads the next known frame; an error frame from the relay becomes
// the matching Go error.
func readAs[T frames.Message](r net.Conn) (T, error) {
	m, err := frames.ReadAs[T](r, 0)
	var fe *frames.Error
	if errors.As(err, &fe) {
		return m, relayError(fe)
	}
	return m, err
}

func relayError(e *frames.Error) error {
	switch e.Code {
	case frames.CodeRevoked:
		return fmt.Errorf("%w (%s)", ErrRevoked, e.Message)
	case frames.CodeUnauthorized:
		return fmt.Errorf("%w: %s", ErrUnauthorized, e.Message)
	}
	return fmt.Errorf("relay: %w", e)
}

func (c *conn) write(m frames.Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return frames.WriteTimeout(c.ctrl, m, writeTimeout)
}

// serve runs the session: it accepts data streams, sends heartbeats, and
// reads the control stream, declaring the relay dead after three intervals
// without any frame from it. It returns *drainError when asked to move.
func (c *conn) serve(ctx context.Context) error {
	a := c.a
	stop := context.AfterFunc(ctx, c.close)
	defer stop()
	a.cur.Store(c)
	defer a.cur.CompareAndSwap(c, nil)
	a.sessionUp()
	a.wg.Go(c.acceptStreams)
	hbDone := make(chan struct{})
	defer close(hbDone)
	a.wg.Go(func() { c.heartbeats(hbDone) })
	interval := c.interval()
	for acks := 0; ; {
		c.ctrl.SetReadDeadline(time.Now().Add(3 * interval))
		m, err := frames.Read(c.ctrl, 0)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return fmt.Errorf("relay silent for %v: declared dead", 3*interval)
			}
			return fmt.Errorf("control stream: %w", err)
		}
		switch m := m.(type) {
		case *frames.HeartbeatAck:
			acks++
			a.acked(acks)
		case *frames.UpdateOffer:
			a.offer(ctx, m)
		case *frames.Unknown:
		case *frames.Leases:
			if a.cfg.OnLeases != nil {
				a.cfg.OnLeases(m.Leases)
			}
		case *frames.Drain:
			return &drainError{m}
		case *frames.Error:
			return relayError(m)
		default:
			return fmt.Errorf("unexpected %v frame from relay", m.Type())
		}
	}
}

func (c *conn) heartbeats(done <-chan struct{}) {
	t := time.NewTicker(c.interval())
	defer t.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-done:
			return
		case <-t.C:
		}
		hb := &frames.Heartbeat{Seq: seq, ActiveStreams: uint32(c.a.active.Load()), TotalStreams: c.a.total.Load()}
		if err := c.write(hb); err != nil {
			c.close() // the reader sees the closed session and reconnects
			return
		}
	}
}

func (c *conn) close() {
	c.once.Do(func() { c.mux.Close() })
}

// acceptStreams serves the relay's data streams until the session closes.
func (c *conn) acceptStreams() {
	for {
		st, err := c.mux.AcceptStream()
		if err != nil {
			return
		}
		c.a.wg.Go(func() { c.a.serveStream(st) })
	}
}

// serveStream reads a stream's header, dials the named local service
// (only a registered one), answers, and splices.
func (a *Agent) serveStream(st *smux.Stream) {
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := frames.Read(st, 4096)
	st.SetReadDeadline(time.Time{})
	open, ok := m.(*frames.StreamOpen)
	if err != nil || !ok {
		st.Close()
		return
	}
	refuse := func(code frames.ErrorCode, msg string) {
		frames.WriteTimeout(st, &frames.StreamRefuse{Code: code, Message: msg}, writeTimeout)
		st.Close()
	}
	svc, ok := a.services[open.Service]
	if !ok {
		refuse(frames.CodeUnknownService, "no service named "+open.Service)
		return
	}
	if int(a.active.Add(1)) > a.cfg.MaxStreams {
		a.active.Add(-1)
		refuse(frames.CodeTooManyStreams, "agent stream limit reached")
		return
	}
	defer a.active.Add(-1)
	a.total.Add(1)
	local, err := net.DialTimeout("tcp", svc.Addr, a.cfg.DialTimeout)
	if err != nil {
		a.log.Warn("local service unreachable", "service", svc.Name, "addr", svc.Addr, "err", err)
		refuse(frames.CodeDialFailed, dialReason(err))
		return
	}
	if err := frames.WriteTimeout(st, &frames.StreamAccept{}, writeTimeout); err != nil {
		local.Close()
		st.Close()
		return
	}
	splice.Splice(st, local)
}

// dialReason describes a local dial failure without revealing the local
// address to the public.
func dialReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timed out"
	default:
		return "unreachable"
	}
}
