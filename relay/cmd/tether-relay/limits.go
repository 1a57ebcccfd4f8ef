package main

import (
	"fmt"

	"github.com/tetherfleet/tether/relay"
)

// rateLimits reads the per-client limits on /_tether/connect and
// /_tether/enroll.
func rateLimits(s spec) (connect, enroll relay.RateLimit, err error) {
	for _, l := range []struct {
		name  string
		rate  string
		burst int
		out   *relay.RateLimit
	}{{"CONNECT", s.ConnectRate, s.ConnectBurst, &connect}, {"ENROLL", s.EnrollRate, s.EnrollBurst, &enroll}} {
		per, err := relay.ParseRate(l.rate)
		if err != nil {
			return connect, enroll, fmt.Errorf("TETHER_%s_RATE: %w", l.name, err)
		}
		if l.burst < 1 && per > 0 {
			return connect, enroll, fmt.Errorf("TETHER_%s_BURST %d: want 1 or more", l.name, l.burst)
		}
		*l.out = relay.RateLimit{PerSecond: per, Burst: l.burst}
	}
	return connect, enroll, nil
}
