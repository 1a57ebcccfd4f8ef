package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// row is one figure: without the tunnel (direct), through the tunnel with
// the baseline agent and with the current agent; each is empty where it
// was not measured.
type row struct {
	name                      string
	direct, baseline, current []float64
	higherBetter              bool
	goal, note                string
}

type report struct {
	settings settings
	started  time.Time
	baseline string // the baseline agent's revision; empty if none
	rows     []row
}

func (r *report) add(x row) {
	r.rows = append(r.rows, x)
	fmt.Printf("  %-48s direct %-20s baseline %-20s current %-20s %s %s %s\n", x.name, summary(x.direct), summary(x.baseline),
		summary(x.current), ratio(x.current, x.direct), ratio(x.current, x.baseline), x.note)
}

// summary is "median (min..max)".
func summary(v []float64) string {
	if len(v) == 0 {
		return "–"
	}
	if len(v) == 1 {
		return num(v[0])
	}
	return fmt.Sprintf("%s (%s..%s)", num(median(v)), num(slices.Min(v)), num(slices.Max(v)))
}

func median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

func num(f float64) string {
	switch {
	case f >= 100:
		return fmt.Sprintf("%.0f", f)
	case f >= 10:
		return fmt.Sprintf("%.1f", f)
	default:
		return fmt.Sprintf("%.3g", f)
	}
}

// ratio is a/b of the medians.
func ratio(a, b []float64) string {
	if len(a) == 0 || len(b) == 0 || median(b) == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", median(a)/median(b))
}

const analysisMarker = "## Analysis"

// write renders BENCHMARKS.md, keeping the hand-written analysis that
// follows analysisMarker in the existing file.
func (r *report) write(machine string) error {
	var b bytes.Buffer
	rev, _ := exec.Command("git", "describe", "--always", "--dirty").Output()
	mode := "make bench"
	if r.settings.quick {
		mode = "BENCH_QUICK=1 make bench"
	}
	fmt.Fprintf(&b, "# Benchmarks\n\nMeasured by `%s` on %s, %s, at %s (took %v).\n\n",
		mode, r.started.UTC().Format("2006-01-02 15:04 MST"), machine, strings.TrimSpace(string(rev)), time.Since(r.started).Round(time.Second))
	fmt.Fprintf(&b, "Everything runs on loopback on this one machine: the relay and the agents are the real binaries, each its own process; "+
		"the load generators (wrk, hey, Go clients) and the origin services share the same %d cores. "+
		"Each figure is the median of %d runs with min..max; *direct* is the same measurement against the origin service without the tunnel, "+
		"in the same run. *Current* is the agent of the working tree, *baseline* the agent built from %s with that revision's own Makefile flags; "+
		"both run at once against the same current relay, each under its own device name, and their runs interleave (direct, baseline, current). "+
		"Goals are from the issue, measured on peers the same way; they are targets, not assertions.\n\n",
		numCPU(), r.settings.reps, dash(r.baseline))
	if r.settings.cluster {
		b.WriteString("The *cluster* rows run nats-server (relay/deploy/nats.conf), a control plane and relays on 127.0.0.1, .2 and .3, each its own process. " +
			"In the forwarded-path rows *direct* is through the relay holding the agent's session (same relay) and *current* through another relay " +
			"(forwarded: user → B → A → agent), so current/direct is the forwarded/same-relay ratio.\n\n")
	}
	b.WriteString("| figure | direct | baseline agent | current agent | current/direct | current/baseline | goal | notes |\n|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", strings.TrimSpace(x.name), summary(x.direct), summary(x.baseline), summary(x.current),
			ratio(x.current, x.direct), ratio(x.current, x.baseline), dash(x.goal), x.note)
	}
	b.WriteString("\n")
	if old, err := os.ReadFile(r.settings.out); err == nil {
		if i := bytes.Index(old, []byte(analysisMarker)); i >= 0 {
			b.Write(old[i:])
		}
	}
	if !bytes.Contains(b.Bytes(), []byte(analysisMarker)) {
		b.WriteString(analysisMarker + "\n\n(to be written after a run)\n")
	}
	return os.WriteFile(r.settings.out, b.Bytes(), 0o644)
}

func dash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

// ensureTools installs wrk and hey from Debian when missing.
func ensureTools() error {
	var missing []string
	for _, t := range []string{"wrk", "hey"} {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%v missing: install them (apt-get install %s) or run as root", missing, strings.Join(missing, " "))
	}
	fmt.Printf("installing %v from Debian\n", missing)
	if out, err := exec.Command("apt-get", "update", "-qq").CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %v\n%s", err, out)
	}
	cmd := exec.Command("apt-get", append([]string{"install", "-y", "-qq"}, missing...)...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get install %v: %v\n%s", missing, err, out)
	}
	return nil
}
