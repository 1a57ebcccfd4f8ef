package cross

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// builtDir holds the agents built once for all tests of the package.
var builtDir string

// built builds the arm64 and armv6 agents once for all tests of the package.
var built = sync.OnceValues(func() (map[string]Result, error) {
	dir, err := os.MkdirTemp("", "tether-cross-")
	if err != nil {
		return nil, err
	}
	builtDir = dir
	var ts []Target
	for _, arch := range []string{"arm64", "armv6"} {
		t, _ := Find("tether-agent", arch)
		ts = append(ts, t)
	}
	rs, err := Build(context.Background(), Options{OutDir: dir, Version: "test", Targets: ts})
	out := map[string]Result{}
	for _, r := range rs {
		out[r.Arch()] = r
	}
	return out, err
})

// AgentBinary is agentBinary for the package's external tests.
var AgentBinary = agentBinary

func agentBinary(t *testing.T, arch string) Result {
	t.Helper()
	if testing.Short() {
		t.Skip("cross-compiles")
	}
	rs, err := built()
	var be *BudgetError
	if err != nil && !errors.As(err, &be) {
		t.Fatal(err)
	}
	return rs[arch]
}

func TestArm64AgentWithinBudget(t *testing.T) {
	r := agentBinary(t, "arm64")
	if r.Budget != mib(6.5) {
		t.Fatalf("the arm64 agent's budget is %d, the design fixes 6.5 MiB", r.Budget)
	}
	if r.OverBudget() {
		t.Fatalf("%v", &BudgetError{Over: []Result{r}})
	}
	t.Logf("%s: %d bytes (%.2f MiB, %.1f%% of budget)", r.Target, r.Size, float64(r.Size)/MiB, 100*float64(r.Size)/float64(r.Budget))
}

func TestBudgetErrorNamesTargetAndSize(t *testing.T) {
	if testing.Short() {
		t.Skip("cross-compiles")
	}
	tg, _ := Find("tether-agent", "arm64")
	tg.Budget = 1000
	rs, err := Build(context.Background(), Options{OutDir: t.TempDir(), Targets: []Target{tg}})
	var be *BudgetError
	if !errors.As(err, &be) || !strings.Contains(err.Error(), "tether-agent linux/arm64 is") || !strings.Contains(err.Error(), fmt.Sprint(rs[0].Size)) {
		t.Fatalf("got %v", err)
	}
}

// TestAgentDeps checks the agent's package graph, as go list -deps sees it
// on every agent target, against AgentForbidden.
func TestAgentDeps(t *testing.T) {
	root, err := ModuleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, tg := range Targets {
		if tg.Binary != "tether-agent" {
			continue
		}
		deps, err := ListDeps(t.Context(), root, tg)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range Forbidden(AgentForbidden, deps) {
			t.Errorf("%s %v", tg, v)
		}
		if !slices.Contains(deps, "github.com/tetherfleet/tether/agent") {
			t.Errorf("%s: go list -deps lists no agent package: the check reads the wrong thing", tg)
		}
	}
	// An entry naming a package of ours that was moved or renamed would
	// silently stop guarding anything.
	for _, d := range AgentForbidden {
		if rel, ok := strings.CutPrefix(d.Path, "github.com/tetherfleet/tether/"); ok {
			if _, err := os.Stat(filepath.Join(root, rel)); err != nil {
				t.Errorf("forbidden %s no longer exists: %v", d.Path, err)
			}
		}
	}
}

// TestAgentBinaryDeps reads the built binary itself: its module list and
// the packages of the functions it keeps for tracebacks.
func TestAgentBinaryDeps(t *testing.T) {
	r := agentBinary(t, "arm64")
	l, err := ReadLinked(r.Path)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range Forbidden(AgentForbidden, append(l.Modules, l.Packages...)) {
		t.Errorf("the agent binary %v", v)
	}
	if !slices.Contains(l.Packages, "github.com/xtaci/smux") || !slices.Contains(l.Packages, "github.com/tetherfleet/tether/agent") {
		t.Errorf("the binary's function table names neither smux nor the agent: the check reads the wrong thing")
	}
	// The design's libraries, each for its job: wss and env configuration.
	for _, mod := range []string{"github.com/coder/websocket", "github.com/kelseyhightower/envconfig"} {
		if !slices.Contains(l.Modules, mod) {
			t.Errorf("go version -m lists no %s: modules %v", mod, l.Modules)
		}
	}
}

// TestBuildFilesUseAgentTags reads the repository's Makefile and Dockerfile:
// every go build of the agent there must use AgentTags, keep -s -w, and
// not turn off inlining.
func TestBuildFilesUseAgentTags(t *testing.T) {
	root, err := ModuleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"Makefile", "Dockerfile"} {
		data, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, b := range GoBuilds(data) {
			if !b.Builds(agentPkg) {
				continue
			}
			n++
			if !SameTags(b.Tags, AgentTags) {
				t.Errorf("%s:%d builds the agent with -tags %q, want %q (cross.AgentTags)", name, b.Line, b.Tags, AgentTags)
			}
			if ld := strings.Fields(b.LDFlags); !slices.Contains(ld, "-s") || !slices.Contains(ld, "-w") {
				t.Errorf("%s:%d builds the agent with -ldflags %q, without -s -w", name, b.Line, b.LDFlags)
			}
			if strings.Contains(b.GCFlags, "-l") {
				t.Errorf("%s:%d builds the agent with -gcflags %q: no -l (inlining stays on)", name, b.Line, b.GCFlags)
			}
		}
		if n == 0 {
			t.Errorf("%s: no go build of %s found", name, agentPkg)
		}
	}
}

// TestReproducible builds the arm64 agent again with an empty build cache:
// the bytes must be identical.
func TestReproducible(t *testing.T) {
	first := agentBinary(t, "arm64")
	tg := first.Target
	rs, err := Build(context.Background(), Options{OutDir: t.TempDir(), Version: "test", Targets: []Target{tg},
		Env: []string{"GOCACHE=" + t.TempDir()}})
	if err != nil {
		t.Fatal(err)
	}
	if rs[0].SHA256 != first.SHA256 {
		t.Fatalf("two builds differ: %s vs %s", first.SHA256, rs[0].SHA256)
	}
	sums, err := os.ReadFile(filepath.Join(filepath.Dir(rs[0].Path), "SHA256SUMS"))
	if err != nil || string(sums) != rs[0].SHA256+"  tether-agent-linux-arm64\n" {
		t.Fatalf("SHA256SUMS: %q %v", sums, err)
	}
}
