package main

import (
	"fmt"
	"os"
	"path/filepath"
)

// testPauseEnv names a test-only knob, not a setting (unstable, and not
// TETHER_-prefixed so that it is never mistaken for one): a directory
// holding two named pipes the test keeps open. After each step of an
// update's swap or rollback the agent writes the step's name and a newline
// to DIR/steps, then waits for one byte on DIR/resume, so that the test
// can kill it at any step.
const testPauseEnv = "TETHERTEST_UPDATE_PAUSE"

// testPause returns the update hook for testPauseEnv's directory; nil
// when it is empty.
func testPause(dir string) func(step string) {
	if dir == "" {
		return nil
	}
	return func(step string) {
		if f, err := os.OpenFile(filepath.Join(dir, "steps"), os.O_WRONLY, 0); err == nil {
			fmt.Fprintln(f, step)
			f.Close()
		}
		if f, err := os.Open(filepath.Join(dir, "resume")); err == nil {
			f.Read(make([]byte, 1))
			f.Close()
		}
	}
}
