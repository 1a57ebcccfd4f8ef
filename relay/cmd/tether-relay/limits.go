package main

import (
	"fmt"

	"github.com/tetherfleet/tether/relay"
)

// rateLimits reads the per-client limits on /_tether/connect,
// /_tether/enroll and the release downloads.
func rateLimits(s spec) (connect, enroll, rel relay.RateLimit, err error) {
	for _, l := range []struct {
		name  string
		rate  string
		burst int
		out   *relay.RateLimit
	}{{"CONNECT", s.ConnectRate, s.ConnectBurst, &connect}, {"ENROLL", s.EnrollRate, s.EnrollBurst, &enroll},
		{"RELEASE", s.ReleaseRate, s.ReleaseBurst, &rel}} {
		per, err := relay.ParseRate(l.rate)
		if err != nil {
			return connect, enroll, rel, fmt.Errorf("TETHER_%s_RATE: %w", l.name, err)
		}
		if l.burst < 1 && per > 0 {
			return connect, enroll, rel, fmt.Errorf("TETHER_%s_BURST %d: want 1 or more", l.name, l.burst)
		}
		*l.out = relay.RateLimit{PerSecond: per, Burst: l.burst}
	}
	return connect, enroll, rel, nil
}
