package main

import (
	"testing"

	"github.com/tetherfleet/tether/frames/cli"
)

// TestSpecNames holds --help's variable names to envconfig's own naming.
func TestSpecNames(t *testing.T) {
	for _, s := range []any{&spec{}, &preflightSpec{}} {
		if err := cli.CheckNames(s); err != nil {
			t.Fatal(err)
		}
	}
}
