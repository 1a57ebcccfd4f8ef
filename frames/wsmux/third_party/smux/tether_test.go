// TETHER PATCH: knob for upstream's long tests (see PATCH.md).
// This file is not part of upstream smux.

package smux

import (
	"os"
	"testing"
)

// longTests reports whether upstream's long tests run at their full size.
// By default the copy's test run stays under a minute with -race on a small
// machine; TETHER_SMUX_LONG=1 (unstable, test-only) restores upstream's sizes:
//
//	TETHER_SMUX_LONG=1 go test -race -timeout 60m ./...
var longTests = os.Getenv("TETHER_SMUX_LONG") == "1"

// skipUnlessLong skips a test that only makes sense at its full size.
func skipUnlessLong(t *testing.T) {
	t.Helper()
	if !longTests {
		t.Skip("upstream's full-size transfer; set TETHER_SMUX_LONG=1 to run it")
	}
}

// longOr returns full when the long tests are on, short otherwise.
func longOr(full, short int64) int64 {
	if longTests {
		return full
	}
	return short
}
