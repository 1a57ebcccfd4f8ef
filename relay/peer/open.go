package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// Back-off after a failed dial to a peer: Opens fail at once with the
// dial's error until it has passed. It starts at redialMin, doubles up to
// redialMax, with jitter, and a session dialled successfully resets it.
const (
	redialMin = 100 * time.Millisecond
	redialMax = 2 * time.Second
)

// peerState is what Open keeps about one peer relay. Its fields other than
// id and slots are guarded by Transport.mu.
type peerState struct {
	id    string
	slots chan struct{} // one per stream open to the peer (MaxStreams)

	sess     *smux.Session // the live session, or nil
	dialing  *dialCall     // the dial in flight, or nil
	failures int           // dials failed in a row
	retryAt  time.Time     // no dial before this after a failure
	lastErr  error         // the last dial's error
}

// dialCall is one dial that concurrent Opens wait for.
type dialCall struct {
	done chan struct{} // closed when sess or err is set
	sess *smux.Session
	err  error
}

// Open opens a stream to a device's agent through relay relayID, which
// listens for peers at addr, writes open on it and returns it. The peer's
// answer is the first frame to read from the stream: the agent's
// stream-accept or stream-refuse, or the peer's own stream-refuse
// (frames.CodeNotHere, too many streams). As on an agent's stream, the
// client's first bytes may be written before the answer arrives.
//
// Open dials one session per peer on first use and keeps it: concurrent
// Opens share one dial, and a session found broken is dialled again (once
// within an Open). addr is only used to dial; a live session is used
// whatever addr says (Forget the peer to move it). After a failed dial,
// Opens fail at once with its error for a back-off of 100 ms doubling up
// to 2 s.
//
// While MaxStreams streams to the peer are open, Open waits for one to be
// closed, until ctx ends (then the error wraps ErrBusy). ctx bounds the
// wait and the dial (which goes on for other Opens), not the stream. Close
// the stream when done: its slot is held until then.
func (t *Transport) Open(ctx context.Context, relayID, addr string, open *frames.PeerOpen) (net.Conn, error) {
	if err := validRelayID(relayID); err != nil {
		return nil, fmt.Errorf("open stream: %w", err)
	}
	p, err := t.peer(relayID)
	if err != nil {
		return nil, err
	}
	if err := t.acquire(ctx, p); err != nil {
		return nil, err
	}
	st, err := t.openStream(ctx, p, addr, open)
	if err != nil {
		<-p.slots
		return nil, err
	}
	t.metrics.streams.WithLabelValues(p.id, "out").Inc()
	return &stream{Stream: st, slots: p.slots}, nil
}

// Forget closes the session to relay relayID, if any, and drops what Open
// knows of it (including the dial back-off): for a relay that left the
// cluster, or moved. Its open streams fail; the next Open dials again.
func (t *Transport) Forget(relayID string) {
	t.mu.Lock()
	p := t.peers[relayID]
	delete(t.peers, relayID)
	var sess *smux.Session
	if p != nil {
		sess, p.sess = p.sess, nil
	}
	t.mu.Unlock()
	if sess != nil {
		sess.Close()
	}
}

// peer returns the state of relay id, created on first use.
func (t *Transport) peer(id string) (*peerState, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	p := t.peers[id]
	if p == nil {
		p = &peerState{id: id, slots: make(chan struct{}, t.cfg.MaxStreams)}
		t.peers[id] = p
	}
	return p, nil
}

// acquire takes a stream slot of p, waiting while all are taken.
func (t *Transport) acquire(ctx context.Context, p *peerState) error {
	select {
	case p.slots <- struct{}{}:
		return nil
	default:
	}
	t.metrics.waits.Inc()
	select {
	case p.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		t.metrics.refused.WithLabelValues("busy").Inc()
		return fmt.Errorf("open stream to relay %s: %d streams open: %w (%w)", p.id, cap(p.slots), ErrBusy, context.Cause(ctx))
	case <-t.ctx.Done():
		return ErrClosed
	}
}

// openStream opens a stream on p's session and writes its peer-open
// within HandshakeTimeout (and ctx's deadline). A session that fails it
// other than by a timeout is dropped, and one dialled again if it was not
// fresh.
func (t *Transport) openStream(ctx context.Context, p *peerState, addr string, open *frames.PeerOpen) (*smux.Stream, error) {
	for attempt := 0; ; attempt++ {
		sess, fresh, err := t.session(ctx, p, addr)
		if err != nil {
			return nil, err
		}
		st, err := sess.OpenStream()
		if err == nil {
			deadline := time.Now().Add(t.cfg.HandshakeTimeout)
			if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
				deadline = d
			}
			st.SetWriteDeadline(deadline)
			if err = frames.Write(st, open); err == nil {
				st.SetWriteDeadline(time.Time{})
				return st, nil
			}
			st.Close()
		}
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			// A busy session, or a short ctx: not a broken one (the
			// keepalive closes a dead one).
			return nil, fmt.Errorf("open stream to relay %s: %w", p.id, err)
		}
		t.drop(p, sess)
		if fresh || attempt > 0 {
			return nil, fmt.Errorf("open stream to relay %s: %w", p.id, err)
		}
		t.log.Debug("peer session broken, dialling again", "peer", p.id, "err", err)
	}
}

// session returns p's live session, or dials one (or waits for the dial in
// flight); fresh says it was dialled for this call.
func (t *Transport) session(ctx context.Context, p *peerState, addr string) (sess *smux.Session, fresh bool, err error) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, false, ErrClosed
	}
	if s := p.sess; s != nil && !s.IsClosed() {
		t.mu.Unlock()
		return s, false, nil
	}
	c := p.dialing
	if c == nil {
		if now := time.Now(); now.Before(p.retryAt) {
			err := p.lastErr
			t.mu.Unlock()
			return nil, false, fmt.Errorf("relay %s unreachable, next dial in %v: %w", p.id, p.retryAt.Sub(now).Round(time.Millisecond), err)
		}
		c = &dialCall{done: make(chan struct{})}
		p.dialing = c
		t.wg.Go(func() { t.dial(p, c, addr) })
	}
	t.mu.Unlock()
	select {
	case <-c.done:
		return c.sess, true, c.err
	case <-ctx.Done():
		return nil, false, fmt.Errorf("dial relay %s: %w", p.id, context.Cause(ctx))
	}
}

// drop closes a session that failed; the next Open dials again.
func (t *Transport) drop(p *peerState, sess *smux.Session) {
	t.mu.Lock()
	if p.sess == sess {
		p.sess = nil
	}
	t.mu.Unlock()
	sess.Close()
}

// dial connects to p for the Opens waiting on c, and keeps the session
// (watched until it ends) unless the Transport closed or p was forgotten
// meanwhile.
func (t *Transport) dial(p *peerState, c *dialCall, addr string) {
	sess, err := t.connect(p.id, addr)
	t.mu.Lock()
	p.dialing = nil
	closed := t.closed
	var delay time.Duration
	switch {
	case err != nil:
		p.failures++
		delay = redialDelay(p.failures)
		p.retryAt, p.lastErr = time.Now().Add(delay), err
	case closed:
		sess.Close()
		sess, err = nil, ErrClosed
	case t.peers[p.id] != p:
		sess.Close()
		sess, err = nil, fmt.Errorf("dial relay %s: forgotten meanwhile", p.id)
	default:
		p.failures, p.sess = 0, sess
		t.metrics.sessions.WithLabelValues("out").Inc()
		t.wg.Go(func() { t.watch(p, sess) })
	}
	c.sess, c.err = sess, err
	t.mu.Unlock()
	failed := !closed && delay > 0
	if failed {
		t.metrics.dialErrors.Inc() // before the waiters see the error
	}
	close(c.done)
	switch {
	case sess != nil:
		t.log.Info("peer session dialled", "peer", p.id, "addr", addr)
	case failed:
		t.log.Warn("dial peer", "peer", p.id, "addr", addr, "err", err, "retry_in", delay)
	}
}

// redialDelay is the back-off after the nth failed dial in a row: full
// range doubling from redialMin to redialMax, the upper half jittered.
func redialDelay(n int) time.Duration {
	d := min(redialMin<<min(n-1, 16), redialMax)
	return d/2 + rand.N(d/2+1)
}

// connect dials relay id at addr, checks its identity, waits for it to
// accept us and starts the smux client, all within HandshakeTimeout.
func (t *Transport) connect(id, addr string) (*smux.Session, error) {
	ctx, cancel := context.WithTimeout(t.ctx, t.cfg.HandshakeTimeout)
	defer cancel()
	raw, err := t.cfg.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial relay %s at %s: %w", id, addr, err)
	}
	if !t.trackDial(raw, true) {
		raw.Close()
		return nil, ErrClosed
	}
	defer t.trackDial(raw, false)
	sess, err := t.handshake(ctx, raw, id)
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("dial relay %s at %s: %w", id, addr, err)
	}
	return sess, nil
}

// trackDial registers (or forgets) a connection in its handshake, which
// Close closes; false means the Transport is closed.
func (t *Transport) trackDial(c net.Conn, add bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !add {
		delete(t.dialing, c)
		return true
	}
	if t.closed {
		return false
	}
	t.dialing[c] = struct{}{}
	return true
}

// handshake runs the client side: TLS (the peer's identity checked by
// clientTLS), then the peer's stream-accept, which says it verified us.
func (t *Transport) handshake(ctx context.Context, raw net.Conn, id string) (*smux.Session, error) {
	if d, ok := ctx.Deadline(); ok {
		raw.SetDeadline(d)
	}
	tc := tls.Client(raw, t.clientTLS(id))
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	if _, err := frames.ReadAs[*frames.StreamAccept](tc, 64); err != nil {
		return nil, fmt.Errorf("wait for the peer to accept us: %w", err)
	}
	raw.SetDeadline(time.Time{})
	return smux.Client(tlsConn{tc, raw}, t.smux)
}

// watch follows a dialled session until it ends (closed, its connection
// broken, or silent for three keepalive intervals), then forgets it.
func (t *Transport) watch(p *peerState, sess *smux.Session) {
	defer t.metrics.sessions.WithLabelValues("out").Dec()
	var err error
	for {
		var st *smux.Stream
		if st, err = sess.AcceptStream(); err != nil {
			break
		}
		st.Close() // the dialling side serves no streams
	}
	sess.Close()
	t.mu.Lock()
	if p.sess == sess {
		p.sess = nil
	}
	t.mu.Unlock()
	t.log.Info("peer session ended", "peer", p.id, "err", err)
}

// stream is a stream returned by Open; Close frees its slot.
type stream struct {
	*smux.Stream
	slots chan struct{}
	once  sync.Once
}

func (s *stream) Close() error {
	err := s.Stream.Close()
	s.once.Do(func() { <-s.slots })
	return err
}
