package relay

import (
	"context"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// Admission of agent handshakes. The expensive part of a connection that
// has not proved its key yet (the WebSocket, the smux session and the
// control plane's answer) runs for at most MaxHandshakes connections at
// once. A connection beyond that waits for a slot, up to HandshakeTimeout
// and with at most 16×MaxHandshakes waiting (a waiting connection holds
// its TLS state and one goroutine, no WebSocket or smux session yet): its
// TLS handshake is already paid for, and a fleet reconnecting at once (its
// relay died) is served in order instead of all of it slowly, timing out
// and starting again. Beyond the queue: 503 with Retry-After at once.

// gate is the handshake admission: slots and the waiting count.
type gate struct {
	slots   chan struct{}
	waiting atomic.Int64
	maxWait int64
	wait    time.Duration // the longest wait for a slot
}

func newGate(n int, wait time.Duration) *gate {
	return &gate{slots: make(chan struct{}, n), maxWait: 16 * int64(n), wait: wait}
}

// enter takes a slot, waiting for one if the queue has room, and returns
// the func that gives it back (once), or false when the relay is too busy.
func (g *gate) enter(ctx context.Context) (release func(), ok bool) {
	select {
	case g.slots <- struct{}{}:
		return g.releaser(), true
	default:
	}
	if g.waiting.Add(1) > g.maxWait {
		g.waiting.Add(-1)
		return nil, false
	}
	defer g.waiting.Add(-1)
	t := time.NewTimer(g.wait)
	defer t.Stop()
	select {
	case g.slots <- struct{}{}:
		return g.releaser(), true
	case <-t.C:
	case <-ctx.Done():
	}
	return nil, false
}

func (g *gate) releaser() func() {
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			<-g.slots
		}
	}
}

// admitHandshake takes a handshake slot for r, or answers 503 with
// Retry-After and returns false.
func (s *Server) admitHandshake(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	release, ok = s.gate.enter(r.Context())
	if !ok {
		s.metrics.handshakes.WithLabelValues("busy").Inc()
		w.Header().Set("Retry-After", strconv.Itoa(1+int(time.Now().UnixNano()%4)))
		http.Error(w, "tether: relay busy with other agents' handshakes; retry shortly (or another relay)", http.StatusServiceUnavailable)
	}
	return release, ok
}
