package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
)

// tetherBinaries are the binaries make cluster builds through the harness;
// nats-server is built beside them from the module in go.mod.
var tetherBinaries = []string{"tether-relay", "tether-controlplane", "tether-agent", "tetherctl"}

// natsServer builds the nats-server command of the module in go.mod, with
// the release flags (its main package has no main.version; -X is a no-op).
var natsServer = cross.Target{Binary: "nats-server", Pkg: "github.com/nats-io/nats-server/v2", GOARCH: runtime.GOARCH}

// build builds every binary the cluster runs into dir.
func build(ctx context.Context, dir string) error {
	var ts []cross.Target
	for _, b := range tetherBinaries {
		t, err := cross.Host(b)
		if err != nil {
			return err
		}
		ts = append(ts, t)
	}
	_, err := cross.Build(ctx, cross.Options{OutDir: dir, Targets: append(ts, natsServer), Bare: true})
	return err
}

// settings runs `bin --help` and returns the TETHER_* variables it lists:
// what the binary really takes, whatever the launcher expects.
func settings(ctx context.Context, bin string) (map[string]bool, error) {
	p, err := harness.Start(harness.Cmd{Path: bin, Args: []string{"--help"}})
	if err != nil {
		return nil, err
	}
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		p.Stop(time.Second)
		return nil, fmt.Errorf("%s --help: no answer in 10s", bin)
	case <-ctx.Done():
		p.Stop(time.Second)
		return nil, ctx.Err()
	}
	if err := p.Err(); err != nil {
		return nil, fmt.Errorf("%s --help: %v\n%s", bin, err, p.Logs())
	}
	vars := map[string]bool{}
	for _, f := range strings.Fields(p.Stdout()) {
		if strings.HasPrefix(f, "TETHER_") {
			vars[f] = true
		}
	}
	if len(vars) == 0 {
		return nil, fmt.Errorf("%s --help lists no TETHER_* setting", bin)
	}
	return vars, nil
}

// optional are the settings a binary may lack: the launcher then leaves
// them out (and says so) instead of refusing to start.
var optional = map[string]bool{"TETHER_PUBLIC_NAMES": true}

// envCheck holds the environment of each process to the settings its
// binary lists in --help.
type envCheck struct {
	missing []string // "tether-relay: TETHER_X, TETHER_Y"
	notes   []string
}

// filter returns env without the optional variables bin does not take,
// and records the others it does not take.
func (c *envCheck) filter(name string, known map[string]bool, env []string) []string {
	var out, missing, dropped []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case known[k]:
			out = append(out, kv)
		case optional[k]:
			dropped = append(dropped, k)
		default:
			missing = append(missing, k)
		}
	}
	slices.Sort(missing)
	missing = slices.Compact(missing)
	slices.Sort(dropped)
	dropped = slices.Compact(dropped)
	if missing != nil {
		c.missing = addOnce(c.missing, fmt.Sprintf("%s does not take %s", name, strings.Join(missing, ", ")))
	}
	if dropped != nil {
		c.notes = addOnce(c.notes, fmt.Sprintf("%s does not take %s yet: started without it", name, strings.Join(dropped, ", ")))
	}
	return out
}

func addOnce(list []string, s string) []string {
	if slices.Contains(list, s) {
		return list
	}
	return append(list, s)
}

// member is one process of the cluster.
type member struct {
	name string // nats-server, controlplane, relay-1, agent
	proc *harness.Proc
	log  *os.File
	note string // where it listens, for the summary
}

// group is the processes started so far, stopped in reverse order.
type group struct {
	logDir  string
	members []*member
	exited  chan *member // each member once, when it exits
}

func newGroup(logDir string) *group {
	return &group{logDir: logDir, exited: make(chan *member, 64)}
}

// start starts a process whose output goes to <log dir>/<name>.log
// (started afresh on every run).
func (g *group) start(name, bin string, args, env []string) (*member, error) {
	f, err := os.OpenFile(filepath.Join(g.logDir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	path, argv, err := inOwnGroup(bin, args)
	if err != nil {
		f.Close()
		return nil, err
	}
	p, err := harness.Start(harness.Cmd{Path: path, Args: argv, Env: env, Stdout: f, Stderr: f})
	if err != nil {
		f.Close()
		return nil, err
	}
	m := &member{name: name, proc: p, log: f}
	g.members = append(g.members, m)
	go func() {
		<-p.Done()
		g.exited <- m
	}()
	return m, nil
}

// stopAll stops every member, the last started first: SIGTERM, then
// SIGKILL after grace. It reports to out what it had to kill.
func (g *group) stopAll(out io.Writer, grace time.Duration) {
	for i := len(g.members) - 1; i >= 0; i-- {
		m := g.members[i]
		begin := time.Now()
		if m.proc.Exited() {
			fmt.Fprintf(out, "  %-13s pid %d had exited: %s\n", m.name, m.proc.PID(), exitReason(m.proc))
		} else if err := m.proc.Stop(grace); err != nil {
			fmt.Fprintf(out, "  %-13s pid %d ignored SIGTERM for %v: killed\n", m.name, m.proc.PID(), grace)
		} else {
			fmt.Fprintf(out, "  %-13s pid %d stopped in %v\n", m.name, m.proc.PID(), time.Since(begin).Round(time.Millisecond))
		}
		m.log.Close()
	}
	g.members = nil
}

// failed wraps err with the tail of m's log.
func (m *member) failed(err error) error {
	return fmt.Errorf("%s (pid %d): %w\n%s", m.name, m.proc.PID(), err, m.tail(20))
}

// tail is the last n lines of m's log, indented, with the log's path.
func (m *member) tail(n int) string {
	b, err := os.ReadFile(m.log.Name())
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	var w bytes.Buffer
	fmt.Fprintf(&w, "  last lines of %s:\n", m.log.Name())
	for _, l := range lines {
		fmt.Fprintf(&w, "    %s\n", l)
	}
	return w.String()
}
