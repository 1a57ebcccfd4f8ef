package natsapi

import (
	"slices"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

func TestNoncesOnceWithinTTL(t *testing.T) {
	s := newNonces(10*time.Minute, 3)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := func(b byte) [32]byte { return [32]byte{b} }
	if !s.add(n(1), t0) || s.add(n(1), t0.Add(time.Minute)) {
		t.Fatal("a nonce was accepted twice within the TTL")
	}
	s.add(n(2), t0.Add(2*time.Minute))
	s.add(n(3), t0.Add(3*time.Minute))
	// Full: the oldest gives way to a new one (and is counted).
	if !s.add(n(4), t0.Add(4*time.Minute)) || s.size() != 3 || s.evicted != 1 {
		t.Fatalf("bound: size %d evicted %d", s.size(), s.evicted)
	}
	if s.add(n(3), t0.Add(5*time.Minute)) {
		t.Fatal("a remembered nonce was accepted again")
	}
	// After the TTL, expired nonces are forgotten, not evicted.
	s.add(n(5), t0.Add(13*time.Minute+time.Second))
	if s.size() != 2 || s.evicted != 1 {
		t.Fatalf("expiry: size %d evicted %d", s.size(), s.evicted)
	}
}

func TestNoncesCompact(t *testing.T) {
	s := newNonces(time.Second, 1<<20)
	t0 := time.Now()
	for i := range 5000 {
		s.add([32]byte{byte(i), byte(i >> 8)}, t0.Add(time.Duration(i)*time.Millisecond))
	}
	if s.size() > 1001 || len(s.order)-s.head != s.size() || len(s.order) > 3000 {
		t.Fatalf("size %d, order %d from %d", s.size(), len(s.order), s.head)
	}
}

func TestMembersExpireAndLost(t *testing.T) {
	m := newMembers(5 * time.Second)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	hello := func(id string, at time.Time) {
		t.Helper()
		if _, err := m.hello(controlplane.HelloRequest{RelayID: id}, at); err != nil {
			t.Fatal(err)
		}
	}
	hello("a", t0)
	hello("b", t0.Add(10*time.Second))
	if down := m.expire(t0.Add(14 * time.Second)); len(down) != 0 {
		t.Fatalf("down after 14s: %v", down)
	}
	if down := m.expire(t0.Add(15 * time.Second)); !slices.Equal(down, []string{"a"}) {
		t.Fatalf("down after 15s: %v, want a (silent for three intervals)", down)
	}
	if lost := m.lostRelays(t0.Add(16 * time.Second)); !slices.Equal(lost, []string{"a"}) {
		t.Fatalf("lost %v", lost)
	}
	// A relay back says hello: live, not lost.
	hello("a", t0.Add(20*time.Second))
	if lost := m.lostRelays(t0.Add(20 * time.Second)); len(lost) != 0 {
		t.Fatalf("lost %v after a's hello", lost)
	}
	// While the control plane itself was cut off, silence proves nothing.
	m.cutOff(t0.Add(40 * time.Second))
	if down := m.expire(t0.Add(50 * time.Second)); len(down) != 0 {
		t.Fatalf("down during the grace: %v", down)
	}
	hello("b", t0.Add(52*time.Second))
	if down := m.expire(t0.Add(55 * time.Second)); !slices.Equal(down, []string{"a"}) {
		t.Fatalf("down after the grace: %v", down)
	}
	// A reset relay holds nothing: not lost. Lost relays are forgotten in time.
	m.reset("a")
	if lost := m.lostRelays(t0.Add(56 * time.Second)); len(lost) != 0 {
		t.Fatalf("lost %v after reset", lost)
	}
	m.expire(t0.Add(time.Hour))
	if lost := m.lostRelays(t0.Add(time.Hour + forgetLost)); len(lost) != 0 {
		t.Fatalf("lost %v after %v", lost, forgetLost)
	}
	live := m.live()
	if len(live) != 0 {
		t.Fatalf("live %v", live)
	}
}

func TestMembersBounded(t *testing.T) {
	m := newMembers(time.Second)
	now := time.Now()
	for i := range maxRelays {
		if _, err := m.hello(controlplane.HelloRequest{RelayID: string(rune('a'+i%26)) + string(rune(i))}, now); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.hello(controlplane.HelloRequest{RelayID: "one-too-many"}, now); err == nil {
		t.Fatal("the table grew past its bound")
	}
}
