package harness

import (
	"context"
	"time"
)

// TB is the part of testing.TB the test helpers use.
type TB interface {
	Helper()
	Cleanup(func())
	Context() context.Context
	TempDir() string
	Failed() bool
	Logf(format string, args ...any)
	Fatalf(format string, args ...any)
}

// StopGrace is how long the test helpers wait after SIGTERM before they
// kill a process.
const StopGrace = 20 * time.Second

// BuildT builds binaries into a directory of t's and returns it; a build
// error fails t.
func BuildT(t TB, binaries ...string) string {
	t.Helper()
	dir := t.TempDir()
	if err := Build(t.Context(), dir, binaries...); err != nil {
		t.Fatalf("%v", err)
	}
	return dir
}

// StartT starts c and stops it when t ends (StopAtEnd); a start error
// fails t.
func StartT(t TB, c Cmd) *Proc {
	t.Helper()
	p, err := Start(c)
	if err != nil {
		t.Fatalf("%v", err)
	}
	StopAtEnd(t, p)
	return p
}

// StopAtEnd stops p when t ends (SIGTERM, then SIGKILL after StopGrace)
// and, if t failed, logs p's output.
func StopAtEnd(t TB, p *Proc) {
	t.Cleanup(func() {
		if err := p.Stop(StopGrace); err != nil {
			t.Logf("%v", err)
		}
		if t.Failed() {
			t.Logf("%s", p.Logs())
		}
	})
}
