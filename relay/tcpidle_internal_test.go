package relay

import (
	"math"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
)

// TestServiceIdleClamped: what an agent asks for a service's idle timeout
// is clamped to 10s..24h, zero means none, an http service's is ignored;
// the relay's ceiling is the shorter when both are set.
func TestServiceIdleClamped(t *testing.T) {
	sess := &session{}
	if d := sess.idleFor("ssh"); d != 0 {
		t.Fatalf("before any registration: %v", d)
	}
	sess.setTCPIdle(&frames.Register{Services: []frames.Service{
		{Name: "ssh", Proto: "tcp", IdleSeconds: 600},
		{Name: "tiny", Proto: "tcp", IdleSeconds: 1},
		{Name: "huge", Proto: "tcp", IdleSeconds: math.MaxUint32},
		{Name: "none", Proto: "tcp"},
		{Name: "web", Proto: "http", IdleSeconds: 60},
	}})
	for svc, want := range map[string]time.Duration{
		"ssh": 10 * time.Minute, "tiny": 10 * time.Second, "huge": 24 * time.Hour, "none": 0, "web": 0, "other": 0,
	} {
		if got := sess.idleFor(svc); got != want {
			t.Errorf("%s: %v, want %v", svc, got, want)
		}
	}
	// A new registration replaces the old.
	sess.setTCPIdle(&frames.Register{Services: []frames.Service{{Name: "ssh", Proto: "tcp"}}})
	if d := sess.idleFor("ssh"); d != 0 {
		t.Errorf("after a registration without it: %v", d)
	}

	m := time.Minute
	for _, c := range []struct{ service, ceiling, want time.Duration }{
		{0, 0, 0}, {m, 0, m}, {0, m, m}, {m, 2 * m, m}, {2 * m, m, m}, {m, -m, m}, {-m, 0, 0},
	} {
		if got := shorterIdle(c.service, c.ceiling); got != c.want {
			t.Errorf("shorterIdle(%v, %v) = %v, want %v", c.service, c.ceiling, got, c.want)
		}
	}
}
