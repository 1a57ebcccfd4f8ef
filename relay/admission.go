package relay

import (
	"context"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Admission of agent handshakes. The expensive part of a connection that
// has not proved its key yet (the WebSocket, the smux session and the
// control plane's answer) runs for at most MaxHandshakes connections at
// once. A connection beyond that waits for a slot, up to HandshakeTimeout
// and with at most 4×MaxHandshakes waiting (a waiting connection holds
// its TLS state, its request and one goroutine, about 45 KiB, no
// WebSocket or smux session yet): its
// TLS handshake is already paid for, and a fleet reconnecting at once (its
// relay died) is served in order instead of all of it slowly, timing out
// and starting again. Beyond the queue: 503 with Retry-After at once.
//
// One client address (an IPv4 address, an IPv6 /64: clientKey) holds at
// most MaxHandshakesPerClient of the slots at once, so that silent
// upgrades from one address, each held until the handshake deadline,
// cannot keep every other agent waiting. Its connections beyond its share
// wait for one of its own slots, in the same queue and within the same
// time (a fleet behind one NAT gets in through its share: a healthy
// handshake takes milliseconds); they may make up at most half of the
// queue, so that other addresses always find room in it. When its wait
// ends, or its half is full: 429 with Retry-After.
//
// The defaults are 1 024 slots and a share of 64: silent upgrades must
// come from 16 addresses to hold every slot (they cost about 35 KiB each,
// 36 MB all), and a fleet behind one NAT gets through at 64 handshakes at
// a time: the 2 000 agents of the default connect burst (ratelimit.go)
// fit in its half of the queue (2 048) and are through in about a second,
// well within the wait. The fleet simulator's 10 000 agents come from 200
// addresses, 50 each: under their share.

// refusal says whether the gate admitted a handshake, and if not, why.
type refusal int

const (
	admitted   refusal = iota
	relayBusy          // no slot in time, or the queue is full: 503
	clientBusy         // the client's share stayed held, or its part of the queue is full: 429
)

// gate is the handshake admission: slots, each client's share of them
// and the waiting count.
type gate struct {
	slots         chan struct{}
	waiting       atomic.Int64
	maxWait       int64
	perClient     int           // slots one client may hold
	maxClientWait int           // connections of one client that may wait
	wait          time.Duration // the longest wait for a slot

	mu      sync.Mutex
	clients map[netip.Prefix]*share // clients holding or waiting for a slot, no others
}

// share is one client's part of the gate. Its fields other than slots
// are guarded by gate.mu.
type share struct {
	slots   chan struct{} // cap perClient
	refs    int           // connections holding or waiting for a slot
	waiting int           // of which in the queue
}

// newGate returns a gate of n slots, at most perClient of them (clamped
// to 1..n) held by one client, with a wait of at most wait for a slot.
func newGate(n, perClient int, wait time.Duration) *gate {
	maxWait := 4 * int64(n)
	return &gate{slots: make(chan struct{}, n), maxWait: maxWait, perClient: min(max(perClient, 1), n),
		maxClientWait: int(max(maxWait/2, 1)), wait: wait, clients: map[netip.Prefix]*share{}}
}

// enter takes a slot for the client at remote ("ip:port"): one of its
// share, then one of the relay's, waiting for them if the queue has room.
// It returns the func that gives the slot back (once), or why it refused.
func (g *gate) enter(ctx context.Context, remote string) (release func(), why refusal) {
	key := clientKey(remote)
	c := g.join(key)
	w := waiter{g: g, c: c}
	// Waiting for its share first, a client takes none of the relay's
	// slots from anyone.
	if why = w.take(ctx, c.slots, clientBusy); why == admitted {
		if why = w.take(ctx, g.slots, relayBusy); why != admitted {
			<-c.slots
		}
	}
	w.done()
	if why != admitted {
		g.leave(key, c)
		return nil, why
	}
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			<-g.slots
			<-c.slots
			g.leave(key, c)
		}
	}, admitted
}

// join counts a connection of the client key and returns its share.
func (g *gate) join(key netip.Prefix) *share {
	g.mu.Lock()
	defer g.mu.Unlock()
	c := g.clients[key]
	if c == nil {
		c = &share{slots: make(chan struct{}, g.perClient)}
		g.clients[key] = c
	}
	c.refs++
	return c
}

// leave uncounts a connection of the client key; its share goes with its
// last one.
func (g *gate) leave(key netip.Prefix, c *share) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c.refs--; c.refs == 0 {
		delete(g.clients, key)
	}
}

// waiter is one connection's passage through the gate: its place in the
// queue and its one deadline for both waits.
type waiter struct {
	g      *gate
	c      *share
	queued bool // counted in g.waiting and c.waiting
	timer  *time.Timer
}

// take puts a token in slots at once or, if the queue has room, within
// the wait; late, it refuses with late.
func (w *waiter) take(ctx context.Context, slots chan struct{}, late refusal) refusal {
	select {
	case slots <- struct{}{}:
		return admitted
	default:
	}
	if why := w.queue(); why != admitted {
		return why
	}
	if w.timer == nil {
		w.timer = time.NewTimer(w.g.wait)
	}
	select {
	case slots <- struct{}{}:
		return admitted
	case <-w.timer.C:
	case <-ctx.Done():
	}
	return late
}

// queue counts the connection as waiting, once, if the queue and the
// client's part of it have room.
func (w *waiter) queue() refusal {
	if w.queued {
		return admitted
	}
	g := w.g
	g.mu.Lock()
	defer g.mu.Unlock()
	if w.c.waiting >= g.maxClientWait {
		return clientBusy
	}
	if g.waiting.Add(1) > g.maxWait {
		g.waiting.Add(-1)
		return relayBusy
	}
	w.c.waiting++
	w.queued = true
	return admitted
}

// done takes the connection out of the queue.
func (w *waiter) done() {
	if w.timer != nil {
		w.timer.Stop()
	}
	if w.queued {
		w.g.mu.Lock()
		w.c.waiting--
		w.g.mu.Unlock()
		w.g.waiting.Add(-1)
	}
}

// admitHandshake takes a handshake slot for r, or answers 503 (the relay
// is busy) or 429 (r's address holds its share) with Retry-After and
// returns false.
func (s *Server) admitHandshake(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	release, why := s.gate.enter(r.Context(), r.RemoteAddr)
	switch why {
	case admitted:
		return release, true
	case clientBusy:
		s.metrics.handshakes.WithLabelValues("client_busy").Inc()
		w.Header().Set("Retry-After", strconv.Itoa(1+int(time.Now().UnixNano()%4)))
		http.Error(w, "tether: too many agent handshakes in progress from your address; retry shortly", http.StatusTooManyRequests)
	default:
		s.metrics.handshakes.WithLabelValues("busy").Inc()
		w.Header().Set("Retry-After", strconv.Itoa(1+int(time.Now().UnixNano()%4)))
		http.Error(w, "tether: relay busy with other agents' handshakes; retry shortly (or another relay)", http.StatusServiceUnavailable)
	}
	return nil, false
}
