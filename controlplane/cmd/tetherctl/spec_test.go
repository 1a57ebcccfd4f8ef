package main

import (
	"testing"

	"github.com/tetherfleet/tether/frames/cli"
)

// TestSpecNames holds --help's variable names to envconfig's own naming.
func TestSpecNames(t *testing.T) {
	if err := cli.CheckNames(&spec{}); err != nil {
		t.Fatal(err)
	}
}
