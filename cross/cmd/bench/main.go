// Command bench is `make bench`: it measures Tether on loopback against the
// same measurement without the tunnel (direct), and the current agent
// against a baseline agent built from an older revision, all in the same
// run, and writes the table to BENCHMARKS.md.
//
// The relay and the agents are the real binaries, each its own process
// (started through cross/harness), so their CPU time and memory are read
// from /proc separately. The fleet figures come from tether-fleetsim,
// which runs many agents (the agent package, each with its own key and
// its own wss connection) in one process, spread over 127.0.0.x source
// addresses. wrk and hey come from Debian and are installed when missing.
//
// The baseline is -baseline-agent REV, or $BENCH_BASELINE, by default the
// parent of the commit that replaced the agent's hand-written WebSocket
// client; "none" measures the current agent alone. BENCH_QUICK=1 runs
// smaller sizes and shorter windows.
//
// The cluster figures (-cluster, on by default; cluster.go) run what make
// cluster runs, compactly: nats-server on relay/deploy/nats.conf, a control
// plane and relays on 127.0.0.1, .2, .3. One agent holds its session on
// relay A only, and the same measurements through A and through B give
// the forwarded/same-relay ratios; then a simulated fleet (this binary
// again, simfleet.go: every agent lists all three relays, rotated) spreads
// over the three, one relay is killed with SIGKILL and the bench times
// how soon every device it held is served again through the others.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/cross"
)

// settings of a run.
type settings struct {
	quick       bool
	reps        int
	bulk        int64         // bytes per throughput run
	loadFor     time.Duration // wrk/hey duration per run
	fleets      []int         // simulated fleet sizes
	idleWindow  time.Duration // window for the idle wire cost
	stormFleet  int
	onlyCluster bool
	cluster     bool // the cluster figures (forwarded path, a relay killed under a fleet)
	clusterN    int  // simulated agents over three relays
	heartbeat   time.Duration
	profile     string // write a relay CPU profile instead of benchmarking
	baseline    string // git revision of the baseline agent; empty: none
	out         string
}

func main() {
	out := flag.String("out", "BENCHMARKS.md", "where the table is written")
	profile := flag.String("profile", "", "instead of the benchmarks: write a CPU profile of the relay under HTTP keep-alive load to this file")
	baseline := flag.String("baseline-agent", os.Getenv("BENCH_BASELINE"), "git revision whose agent is measured next to the current one ($BENCH_BASELINE; "+
		"empty: the parent of the commit that replaced the agent's WebSocket client; none: no baseline)")
	clusterFigs := flag.Bool("cluster", true, "also measure a cluster (NATS, a control plane, relays on 127.0.0.1-3): the forwarded path against the same-relay path, and a relay killed under a fleet")
	onlyCluster := flag.Bool("only-cluster", false, "measure the cluster figures alone")
	flag.Parse()
	s := settings{cluster: *clusterFigs || *onlyCluster, onlyCluster: *onlyCluster, quick: os.Getenv("BENCH_QUICK") != "", reps: 3, heartbeat: 15 * time.Second, out: *out, profile: *profile}
	if s.quick {
		s.bulk, s.loadFor, s.fleets, s.idleWindow, s.stormFleet = 128<<20, 2*time.Second, []int{1000}, 15*time.Second, 1000
		s.clusterN = 1000
	} else {
		s.bulk, s.loadFor, s.fleets, s.idleWindow, s.stormFleet = 1<<30, 5*time.Second, []int{1000, 10000}, 30*time.Second, 10000
		s.clusterN = 10000
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch *baseline {
	case "none":
	case "":
		s.baseline = defaultBaseline(ctx)
	default:
		s.baseline = *baseline
	}
	if s.profile != "" {
		s.baseline = ""
	}
	limit := 20 * time.Minute
	if s.quick {
		limit = 6 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, limit) // builds and every load loop are bounded
	defer cancel()
	start := time.Now()
	if err := run(ctx, s); err != nil {
		log.Fatalf("bench: %v", err)
	}
	log.Printf("bench done in %v; table in %s", time.Since(start).Round(time.Second), s.out)
}

func run(ctx context.Context, s settings) error {
	raiseFDLimit()
	if err := ensureTools(); err != nil {
		return err
	}
	start := time.Now()
	env, err := newEnv(ctx, s)
	if env != nil {
		defer env.close()
	}
	if err != nil {
		return err
	}
	if s.profile != "" {
		return profileRelay(ctx, env, s.profile)
	}
	r := &report{settings: s, started: start}
	sizes := make([][]float64, len(env.agents))
	for i, a := range env.agents {
		sizes[i] = []float64{float64(a.arm64) / cross.MiB}
		if a.label == "baseline" {
			r.baseline = a.rev
		}
	}
	if s.onlyCluster {
		return clusterAndWrite(ctx, env, r)
	}
	budget, _ := cross.Find("tether-agent", "arm64")
	r.add(env.row(row{name: "agent size, stripped linux/arm64 (MiB)", goal: fmt.Sprintf("≤ %.1f (budget)", float64(budget.Budget)/cross.MiB)}, sizes))
	log.Printf("throughput (%d MiB per run, %d runs each)", s.bulk>>20, s.reps)
	if err := benchThroughput(ctx, env, r); err != nil {
		return fmt.Errorf("throughput: %w", err)
	}
	log.Printf("HTTP load (%v per run)", s.loadFor)
	if err := benchHTTP(ctx, env, r); err != nil {
		return fmt.Errorf("http load: %w", err)
	}
	for _, n := range s.fleets {
		log.Printf("fleet of %d idle agents", n)
		if err := benchFleet(ctx, env, r, n, n == s.stormFleet); err != nil {
			return fmt.Errorf("fleet of %d: %w", n, err)
		}
	}
	return clusterAndWrite(ctx, env, r)
}

// clusterAndWrite measures the cluster figures (unless -cluster=false) and writes the table.
func clusterAndWrite(ctx context.Context, env *env, r *report) error {
	s := env.s
	if s.cluster {
		log.Printf("cluster: forwarded path, then %d agents over 3 relays and one killed", s.clusterN)
		if err := benchCluster(ctx, env, r, s.clusterN); err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
	}
	return r.write(machine())
}

func numCPU() int { return runtime.NumCPU() }

func machine() string {
	host, _ := os.Hostname()
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d cores (%s), %s %s/%s", host, runtime.NumCPU(), cpu, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func raiseFDLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil {
		l.Cur = max(l.Cur, min(l.Max, 1<<20))
		if l.Max < 200000 {
			l.Max, l.Cur = 200000, 200000 // as root; ignored otherwise
		}
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}
