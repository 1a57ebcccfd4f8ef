package relay

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// TestGate: handshakes beyond the cap wait for a slot, in order of
// release, up to the wait; beyond the queue they are refused
// at once; a release counts once.
func TestGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const wait = 10 * time.Second
		g := newGate(2, 2, wait) // 2 slots, 8 waiting
		ctx := context.Background()
		r1, ok1 := g.enter(ctx, "10.0.0.1:1000")
		r2, ok2 := g.enter(ctx, "10.0.0.2:1000")
		if ok1 != admitted || ok2 != admitted {
			t.Fatal("the first two handshakes were refused")
		}
		got := make(chan refusal, 8)
		for i := range 8 { // from as many addresses: none is over its share
			go func() { _, why := g.enter(ctx, fmt.Sprintf("10.0.1.%d:1000", i)); got <- why }()
		}
		synctest.Wait()
		if _, why := g.enter(ctx, "10.0.2.1:1000"); why != relayBusy {
			t.Fatalf("a waiter beyond a full queue: %v, want relayBusy", why)
		}
		r1()
		r1() // once only
		synctest.Wait()
		if len(got) != 1 || <-got != admitted {
			t.Fatalf("after one release: %d admitted, want 1", len(got))
		}
		start := time.Now()
		time.Sleep(wait) // fake time: the other 7 give up
		synctest.Wait()
		if len(got) != 7 {
			t.Fatalf("%d waiters answered after %v, want 7 refused", len(got), time.Since(start))
		}
		for range 7 {
			if why := <-got; why != relayBusy {
				t.Fatalf("a waiter with no slot free: %v, want relayBusy", why)
			}
		}
		r2()
		if r, why := g.enter(ctx, "10.0.0.1:1000"); why != admitted {
			t.Fatal("a free slot was refused")
		} else {
			r()
		}
	})
}

// TestGateClientShare: a client holding its share of the slots waits for
// one of its own while other clients are admitted at once; its wait ends
// in clientBusy, and its waiters may fill half of the queue, no more,
// while others still queue for the relay's slots. An IPv6 /64 is one
// client.
func TestGateClientShare(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const wait = 10 * time.Second
		g := newGate(4, 2, wait) // 4 slots, 2 per client, 16 waiting, 8 of one client
		ctx := context.Background()
		var held []func()
		for _, remote := range []string{"[2001:db8::1]:1", "[2001:db8::2]:2"} {
			r, why := g.enter(ctx, remote)
			if why != admitted {
				t.Fatalf("%s under its share: %v", remote, why)
			}
			held = append(held, r)
		}
		got := make(chan refusal, 8)
		for i := range 8 { // the attacker's /64 fills its half of the queue
			go func() { _, why := g.enter(ctx, fmt.Sprintf("[2001:db8::%x]:3", 100+i)); got <- why }()
		}
		synctest.Wait()
		if len(got) != 0 {
			t.Fatalf("%d of the client's connections beyond its share answered at once, want them waiting", len(got))
		}
		if _, why := g.enter(ctx, "[2001:db8::ffff]:4"); why != clientBusy {
			t.Fatalf("past the client's half of the queue: %v, want clientBusy", why)
		}
		// Another client is admitted at once, twice: the relay's other slots
		// are free whatever the first one does.
		other1, why1 := g.enter(ctx, "192.0.2.1:1")
		other2, why2 := g.enter(ctx, "192.0.2.1:2")
		if why1 != admitted || why2 != admitted {
			t.Fatalf("another client: %v %v, want admitted", why1, why2)
		}
		// The relay is full now: a third client queues (its half is free)
		// and gets the slot the other client gives back.
		third := make(chan refusal, 1)
		go func() {
			r, why := g.enter(ctx, "192.0.2.2:1")
			if r != nil {
				r()
			}
			third <- why
		}()
		synctest.Wait()
		if len(third) != 0 {
			t.Fatal("a third client was admitted with no slot free")
		}
		other1()
		synctest.Wait()
		if why := <-third; why != admitted {
			t.Fatalf("a third client after a release: %v", why)
		}
		// One of the attacker's own slots comes back: one waiter of its
		// gets it (the relay has one free), the others time out.
		held[0]()
		synctest.Wait()
		if len(got) != 1 || <-got != admitted {
			t.Fatalf("after the client released one slot: %d answered, want 1 admitted", len(got))
		}
		time.Sleep(wait)
		synctest.Wait()
		if len(got) != 7 {
			t.Fatalf("%d of 7 waiters answered after the wait", len(got))
		}
		for range 7 {
			if why := <-got; why != clientBusy {
				t.Fatalf("a waiter for the client's share: %v, want clientBusy", why)
			}
		}
		held[1]()
		other2()
		// The admitted waiter's slot is still held (it never released).
		if n := len(g.clients); n != 1 {
			t.Fatalf("%d clients in the gate, want 1 (the admitted waiter's)", n)
		}
		if w := g.waiting.Load(); w != 0 {
			t.Fatalf("%d waiting, want 0", w)
		}
	})
}

// TestGateBookkeeping: many connections from a few clients entering and
// leaving at once never hold more than the slots or a client more than its
// share, and once they are gone the gate holds nothing: no slot, no
// waiter, no client entry (run it with -race).
func TestGateBookkeeping(t *testing.T) {
	const n, perClient, clients, conns = 8, 3, 5, 2000
	g := newGate(n, perClient, time.Minute)
	var held atomic.Int32
	var per [clients]atomic.Int32
	var over atomic.Int32
	var admittedN, refusedN atomic.Int32
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() {
			c := i % clients
			release, why := g.enter(context.Background(), fmt.Sprintf("10.1.0.%d:%d", c, 1000+i))
			if why != admitted {
				refusedN.Add(1)
				return
			}
			admittedN.Add(1)
			h, pc := held.Add(1), per[c].Add(1)
			if h > n || pc > perClient {
				over.Add(1)
			}
			runtime.Gosched()
			per[c].Add(-1)
			held.Add(-1)
			release()
			release()
		})
	}
	wg.Wait()
	t.Logf("%d connections from %d clients through %d slots (%d each): %d admitted, %d refused (the queue holds %d, %d per client)",
		conns, clients, n, perClient, admittedN.Load(), refusedN.Load(), g.maxWait, g.maxClientWait)
	if over.Load() != 0 {
		t.Fatalf("%d times over the slots or a client's share", over.Load())
	}
	if admittedN.Load() == 0 {
		t.Fatal("nothing admitted")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.slots) != 0 || g.waiting.Load() != 0 || len(g.clients) != 0 {
		t.Fatalf("after all left: %d slots held, %d waiting, %d client entries (%v), want none",
			len(g.slots), g.waiting.Load(), len(g.clients), g.clients)
	}
}

// TestClientCapsGroupIPv6: the per-client cap counts an IPv6 /64 as one
// client, as the rate limits do: a client with a /64 cannot take a
// device's whole stream cap by changing addresses.
func TestClientCapsGroupIPv6(t *testing.T) {
	c := newClientCaps(2)
	for _, remote := range []string{"[2001:db8::1]:1000", "[2001:db8::2]:1000"} {
		if _, ok := c.take("d1", remote); !ok {
			t.Fatalf("%s refused under the cap", remote)
		}
	}
	if _, ok := c.take("d1", "[2001:db8::ffff]:2000"); ok {
		t.Fatal("a third address of the same /64 was admitted past the cap of 2")
	}
	if _, ok := c.take("d1", "[2001:db8:0:1::1]:1000"); !ok {
		t.Fatal("another /64 was refused")
	}
	if _, ok := c.take("d2", "[2001:db8::3]:1000"); !ok {
		t.Fatal("another device was refused")
	}
}
