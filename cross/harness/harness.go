// Package harness runs Tether's binaries from the outside, as processes:
// it builds them the release way, starts them with an environment,
// captures their output, waits for them to be ready, reads their memory
// and CPU time from /proc, and stops them by PID.
//
// It serves the contract test, the qemu smoke test, the bench and make run
// (tether-demo). It only ever signals processes it started. The helpers
// for tests (StartT, BuildT, StopAtEnd) take a TB, the part of testing.TB
// they use, so that the package does not link testing into the demo.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/cross"
)

// Build builds binaries (tether-relay, tether-agent, ..., tether-fleetsim)
// for this machine into dir, the release way: cross.Build's flags and each
// binary's tags (cross.AgentTags for the agent), named plainly
// (dir/tether-agent) and stamped with version "dev".
func Build(ctx context.Context, dir string, binaries ...string) error {
	var ts []cross.Target
	for _, b := range binaries {
		t, err := cross.Host(b)
		if err != nil {
			return err
		}
		ts = append(ts, t)
	}
	_, err := cross.Build(ctx, cross.Options{OutDir: dir, Targets: ts, Bare: true})
	return err
}

// Cmd is a process to start.
type Cmd struct {
	Path string
	Args []string
	// Env is added to this process's environment (later entries win).
	Env []string
	// Stdout and Stderr receive the output. Nil means it is captured, for
	// Proc.Stdout, Proc.Stderr and Proc.Logs.
	Stdout, Stderr io.Writer
}

// Proc is a process started by Start.
type Proc struct {
	name     string
	cmd      *exec.Cmd
	out, err *SyncBuffer // nil when Cmd gave a writer
	done     chan struct{}
	waitErr  error // set before done is closed
}

// Start starts c. The caller must Stop it (or see it exit).
func Start(c Cmd) (*Proc, error) {
	p := &Proc{name: c.Path, cmd: exec.Command(c.Path, c.Args...), done: make(chan struct{})}
	if i := strings.LastIndexByte(c.Path, '/'); i >= 0 {
		p.name = c.Path[i+1:]
	}
	p.cmd.Env = append(os.Environ(), c.Env...)
	p.cmd.Stdout, p.cmd.Stderr = c.Stdout, c.Stderr
	if c.Stdout == nil {
		p.out = &SyncBuffer{}
		p.cmd.Stdout = p.out
	}
	if c.Stderr == nil {
		p.err = &SyncBuffer{}
		p.cmd.Stderr = p.err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Name is the binary's file name.
func (p *Proc) Name() string { return p.name }

// PID is the process ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err waits for the process to exit and returns what exec.Cmd.Wait said
// (nil for status 0).
func (p *Proc) Err() error {
	<-p.done
	return p.waitErr
}

// ExitCode waits for the process to exit and returns its status; -1 when a
// signal ended it.
func (p *Proc) ExitCode() int {
	<-p.done
	return p.cmd.ProcessState.ExitCode()
}

// WaitExit waits up to within for the process to exit.
func (p *Proc) WaitExit(within time.Duration) error {
	select {
	case <-p.done:
		return nil
	case <-time.After(within):
		return fmt.Errorf("%s (pid %d) still running after %v", p.name, p.PID(), within)
	}
}

// Stdout is the captured standard output so far.
func (p *Proc) Stdout() string { return p.out.String() }

// Stderr is the captured standard error so far.
func (p *Proc) Stderr() string { return p.err.String() }

// Logs is the captured output, labelled, for a failure report.
func (p *Proc) Logs() string {
	var b strings.Builder
	for _, s := range []struct {
		name string
		buf  *SyncBuffer
	}{{"stdout", p.out}, {"stderr", p.err}} {
		if s.buf != nil && s.buf.Len() > 0 {
			fmt.Fprintf(&b, "--- %s %s (pid %d):\n%s", p.name, s.name, p.PID(), s.buf.String())
		}
	}
	return b.String()
}

// Signal sends sig to the process, unless it has exited.
func (p *Proc) Signal(sig os.Signal) error {
	if p.Exited() {
		return nil
	}
	return p.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM and waits up to grace for the process to exit, then
// kills it; the error says it had to be killed.
func (p *Proc) Stop(grace time.Duration) error { return p.StopWith(syscall.SIGTERM, grace) }

// StopWith is Stop with another signal (SIGINT, or SIGKILL to crash it).
func (p *Proc) StopWith(sig os.Signal, grace time.Duration) error {
	if p.Exited() {
		return nil
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s (pid %d) ignored %v for %v: killed", p.name, p.PID(), sig, grace)
	}
}

// RSS returns the process's resident set size and its peak, in bytes.
func (p *Proc) RSS() (cur, peak int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID()))
	if err != nil {
		return 0, 0, err
	}
	for l := range strings.Lines(string(b)) {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			cur = v << 10
		case "VmHWM:":
			peak = v << 10
		}
	}
	return cur, peak, nil
}

// CPU returns the process's user and system CPU time so far.
func (p *Proc) CPU() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID()))
	if err != nil {
		return 0, err
	}
	// The fields after "pid (comm) ": state is the first, utime the 12th.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 > len(b) {
		return 0, fmt.Errorf("/proc/%d/stat: %q", p.PID(), b)
	}
	f := strings.Fields(string(b[i+2:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", p.PID(), b)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100, nil // USER_HZ
}

// Poll calls cond every 50ms until it returns nil, for at most timeout.
// It fails fast, with the process's error, when one of watch exits.
func Poll(ctx context.Context, timeout time.Duration, cond func() error, watch ...*Proc) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	exited := make(chan *Proc, len(watch))
	for _, p := range watch {
		go func() {
			select {
			case <-p.done:
				exited <- p
			case <-ctx.Done():
			}
		}()
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		select {
		case p := <-exited:
			return fmt.Errorf("%s exited (%v) while waiting: %w", p.name, p.waitErr, err)
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("not within %v: %w", timeout, err)
			}
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// WaitHTTP polls url until it answers status (e.g. a /readyz 200), for at
// most timeout, failing fast when one of watch exits.
func WaitHTTP(ctx context.Context, url string, status int, timeout time.Duration, watch ...*Proc) error {
	client := &http.Client{Timeout: 2 * time.Second}
	return Poll(ctx, timeout, func() error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != status {
			return fmt.Errorf("GET %s: %s, want %d", url, resp.Status, status)
		}
		return nil
	}, watch...)
}

// SyncBuffer is a bytes.Buffer safe for a writer and readers at once
// (a process's output, a logger's lines read by a test).
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String is the content so far; "" for a nil buffer (output not captured).
func (s *SyncBuffer) String() string {
	if s == nil {
		return ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *SyncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}
