package natsapi

import (
	"sync"
	"time"
)

// nonces remembers the handshake nonces of accepted connect requests for
// a while, so that each is accepted once: a captured nonce and signature
// cannot open a second session. The set is bounded: when it is full, the
// oldest nonce is forgotten before its time (and evicted counts it).
type nonces struct {
	ttl time.Duration
	max int

	mu      sync.Mutex
	seen    map[[32]byte]time.Time
	order   [][32]byte // oldest first; order[head:] are live
	head    int
	evicted uint64
}

func newNonces(ttl time.Duration, max int) *nonces {
	return &nonces{ttl: ttl, max: max, seen: map[[32]byte]time.Time{}}
}

// add records n at now and reports whether it was new.
func (s *nonces) add(n [32]byte, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Forget what expired.
	for s.head < len(s.order) && now.Sub(s.seen[s.order[s.head]]) >= s.ttl {
		s.forgetOldest()
	}
	if _, ok := s.seen[n]; ok {
		return false
	}
	// Full: the oldest gives way.
	for len(s.seen) >= s.max && s.head < len(s.order) {
		s.forgetOldest()
		s.evicted++
	}
	if s.head > len(s.order)/2 && s.head > 1024 {
		s.order = append([][32]byte(nil), s.order[s.head:]...)
		s.head = 0
	}
	s.seen[n] = now
	s.order = append(s.order, n)
	return true
}

func (s *nonces) forgetOldest() {
	delete(s.seen, s.order[s.head])
	s.head++
}

// size is how many nonces are remembered.
func (s *nonces) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.seen)
}
