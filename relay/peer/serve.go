package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// Accept back-off after a failure other than a closed listener
// (nats-server's acceptError): it starts small and doubles, and the end of
// Serve cuts it short.
const (
	acceptBackoffMin = 10 * time.Millisecond
	acceptBackoffMax = time.Second
)

const (
	// refuseTimeout bounds writing a refusal in a session's accept loop,
	// which accepts no other stream meanwhile.
	refuseTimeout = time.Second
	// openLimit is the largest peer-open frame read: three strings.
	openLimit = 4 << 10
)

// Serve accepts peer relays on ln and serves the streams they open with
// Config.Handler, until ctx ends or the Transport is closed. Then it closes
// ln and every session it accepted, waits for their handlers to return, and
// returns nil. Another failure of ln is returned (temporary ones are retried
// after a back-off).
func (t *Transport) Serve(ctx context.Context, ln net.Listener) error {
	if t.cfg.Handler == nil {
		return errors.New("peer: Serve needs Config.Handler")
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	t.wg.Add(1)
	t.mu.Unlock()
	defer t.wg.Done()

	ctx, cancel := context.WithCancel(ctx)
	var conns sync.WaitGroup
	defer func() {
		cancel()
		conns.Wait()
	}()
	conns.Go(func() {
		select {
		case <-ctx.Done():
		case <-t.ctx.Done():
			cancel() // Close: the sessions of this Serve end too
		}
		ln.Close()
	})

	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || t.ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept peers on %s: %w", ln.Addr(), err)
			}
			delay = min(max(2*delay, acceptBackoffMin), acceptBackoffMax)
			t.log.Warn("accept peer", "addr", ln.Addr(), "err", err, "retry_in", delay)
			if !sleep(ctx, delay) {
				return nil
			}
			continue
		}
		delay = 0
		conns.Go(func() { t.serveConn(ctx, c) })
	}
}

// sleep waits for d or the end of ctx; false means ctx ended.
func sleep(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// serveConn authenticates a peer on raw and serves its session until
// either ends.
func (t *Transport) serveConn(ctx context.Context, raw net.Conn) {
	mux, id, err := t.accept(ctx, raw)
	if err != nil {
		raw.Close()
		if ctx.Err() == nil {
			t.metrics.handshakeErrors.Inc()
			t.log.Warn("peer handshake refused", "remote", raw.RemoteAddr().String(), "err", err)
		}
		return
	}
	t.serveSession(ctx, mux, id, raw.RemoteAddr())
}

// accept runs the server side of the handshake under HandshakeTimeout:
// TLS with the peer's certificate verified, then the stream-accept frame.
func (t *Transport) accept(ctx context.Context, raw net.Conn) (*smux.Session, string, error) {
	raw.SetDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	tc := tls.Server(raw, t.server)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, "", fmt.Errorf("TLS handshake: %w", err)
	}
	id, err := verifiedPeer(tc.ConnectionState()) // checked in the handshake already
	if err != nil {
		return nil, "", err
	}
	if err := frames.Write(tc, &frames.StreamAccept{}); err != nil {
		return nil, id, fmt.Errorf("accept relay %s: %w", id, err)
	}
	raw.SetDeadline(time.Time{})
	mux, err := smux.Server(tlsConn{tc, raw}, t.smux)
	return mux, id, err
}

// serveSession accepts the streams of peer id's session, each served by
// the Handler in its own goroutine, at most MaxPeerStreams at once.
func (t *Transport) serveSession(ctx context.Context, mux *smux.Session, id string, remote net.Addr) {
	log := t.log.With("peer", id, "remote", remote.String())
	log.Info("peer session accepted")
	gauge := t.metrics.sessions.WithLabelValues("in")
	gauge.Inc()
	defer gauge.Dec()

	ctx, cancel := context.WithCancel(context.WithValue(ctx, relayKey{}, id))
	var streams sync.WaitGroup
	streams.Go(func() {
		<-ctx.Done() // the session ended, or Serve did
		mux.Close()
	})
	slots := make(chan struct{}, t.cfg.MaxPeerStreams)
	var err error
	for {
		var st *smux.Stream
		if st, err = mux.AcceptStream(); err != nil {
			break
		}
		select {
		case slots <- struct{}{}:
		default:
			t.metrics.refused.WithLabelValues("cap").Inc()
			msg := fmt.Sprintf("relay %s: %d streams open from relay %s", t.cfg.RelayID, cap(slots), id)
			frames.WriteTimeout(st, &frames.StreamRefuse{Code: frames.CodeTooManyStreams, Message: msg}, refuseTimeout)
			st.Close()
			continue
		}
		streams.Go(func() {
			defer func() { <-slots }()
			t.serveStream(ctx, id, st)
		})
	}
	cancel()
	streams.Wait()
	log.Info("peer session ended", "err", err)
}

// serveStream reads a stream's peer-open and hands the stream to the
// Handler; a stream without a valid one within HandshakeTimeout is refused.
func (t *Transport) serveStream(ctx context.Context, peer string, st *smux.Stream) {
	defer st.Close()
	st.SetReadDeadline(time.Now().Add(t.cfg.HandshakeTimeout))
	open, err := frames.ReadAs[*frames.PeerOpen](st, openLimit)
	st.SetReadDeadline(time.Time{})
	if err != nil {
		if ctx.Err() != nil {
			return // the session ended
		}
		t.metrics.refused.WithLabelValues("bad_open").Inc()
		t.log.Debug("peer stream without peer-open", "peer", peer, "err", err)
		refuse := &frames.StreamRefuse{Code: frames.CodeBadRequest, Message: "no valid peer-open: " + err.Error()}
		frames.WriteTimeout(st, refuse, refuseTimeout)
		return
	}
	t.metrics.streams.WithLabelValues(peer, "in").Inc()
	t.cfg.Handler(ctx, open, st)
}
