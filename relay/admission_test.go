package relay

import (
	"context"
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
		g := newGate(2, wait) // 2 slots, 32 waiting
		ctx := context.Background()
		r1, ok1 := g.enter(ctx)
		r2, ok2 := g.enter(ctx)
		if !ok1 || !ok2 {
			t.Fatal("the first two handshakes were refused")
		}
		got := make(chan bool, 32)
		for range 32 {
			go func() { _, ok := g.enter(ctx); got <- ok }()
		}
		synctest.Wait()
		if _, ok := g.enter(ctx); ok {
			t.Fatal("a waiter was admitted to a full queue")
		}
		r1()
		r1() // once only
		synctest.Wait()
		if len(got) != 1 || !<-got {
			t.Fatalf("after one release: %d admitted, want 1", len(got))
		}
		start := time.Now()
		time.Sleep(wait) // fake time: the other 31 give up
		synctest.Wait()
		if len(got) != 31 {
			t.Fatalf("%d waiters answered after %v, want 31 refused", len(got), time.Since(start))
		}
		for range 31 {
			if <-got {
				t.Fatal("a waiter was admitted with no slot free")
			}
		}
		r2()
		if r, ok := g.enter(ctx); !ok {
			t.Fatal("a free slot was refused")
		} else {
			r()
		}
	})
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
