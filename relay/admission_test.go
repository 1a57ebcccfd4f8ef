package relay

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// TestGate: handshakes beyond the cap wait for a slot, in order of
// release, up to handshakeQueueWait; beyond the queue they are refused
// at once; a release counts once.
func TestGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate(2) // 2 slots, 8 waiting
		ctx := context.Background()
		r1, ok1 := g.enter(ctx)
		r2, ok2 := g.enter(ctx)
		if !ok1 || !ok2 {
			t.Fatal("the first two handshakes were refused")
		}
		got := make(chan bool, 8)
		for range 8 {
			go func() { _, ok := g.enter(ctx); got <- ok }()
		}
		synctest.Wait()
		if _, ok := g.enter(ctx); ok {
			t.Fatal("a ninth waiter was admitted to a full queue")
		}
		r1()
		r1() // once only
		synctest.Wait()
		if len(got) != 1 || !<-got {
			t.Fatalf("after one release: %d admitted, want 1", len(got))
		}
		start := time.Now()
		time.Sleep(handshakeQueueWait) // fake time: the other seven give up
		synctest.Wait()
		if len(got) != 7 {
			t.Fatalf("%d waiters answered after %v, want 7 refused", len(got), time.Since(start))
		}
		for range 7 {
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
