//go:build race

package relay_test

// raceEnabled: the race detector multiplies memory; figures are reported, not held to bounds.
const raceEnabled = true
