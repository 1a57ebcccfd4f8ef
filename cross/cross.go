// Package cross builds Tether's release binaries for every board in the
// fleet, reproducibly, with a size budget per target and SHA256SUMS.
//
// The targets and their budgets are the one table below, and AgentTags
// are the agent's build tags wherever it is built. A build that exceeds a
// budget fails naming the target and its size: the agent must stay small
// enough for a Pi Zero and an OpenWrt router. AgentForbidden (deps.go) is
// what the agent must never link, with the reason for each entry.
package cross

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
)

// MiB is 2^20 bytes.
const MiB = 1 << 20

// AgentTags are the build tags (comma-separated, as go build -tags takes
// them) of every build of the agent: release, tests, bench, Makefile and
// Dockerfile (a test reads the last two). nethttpomithttp2 leaves HTTP/2
// out of net/http: the agent speaks HTTP/1.1 only (the WebSocket upgrade
// and the enrollment POST), and the HTTP/2 code would cost its binary
// about 0.4 MiB.
const AgentTags = "nethttpomithttp2"

// Target is one binary for one platform.
type Target struct {
	Binary string // tether-agent, tether-relay, ...
	Pkg    string // package path relative to the module root
	GOARCH string
	GOARM  string // arm only: "6" (Pi Zero/1) or "7" (Pi 2/3)
	GOMIPS string // mips only: "softfloat" for routers without an FPU
	Tags   string // build tags, comma-separated; empty means none
	Budget int64  // largest allowed size in bytes, stripped
	Board  string // what runs it
}

// Arch names the platform as it appears in file names: arm64, armv6, ...
func (t Target) Arch() string {
	if t.GOARCH == "arm" {
		return "armv" + t.GOARM
	}
	return t.GOARCH
}

// Filename is the binary's name in the output directory.
func (t Target) Filename() string { return t.Binary + "-linux-" + t.Arch() }

// String names the target in messages.
func (t Target) String() string { return t.Binary + " linux/" + t.Arch() }

func mib(f float64) int64 { return int64(f * MiB) }

// Targets is the build matrix with its size budgets. The agent's budgets
// hold it with net/http, coder/websocket and envconfig linked (the
// libraries the design names), HTTP/2 left out by AgentTags.
var Targets = []Target{
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "arm", GOARM: "6", Budget: mib(7.0), Board: "Raspberry Pi Zero / 1"},
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "arm", GOARM: "7", Budget: mib(7.0), Board: "Raspberry Pi 2 / 3 (32-bit OS)"},
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "arm64", Budget: mib(6.5), Board: "Raspberry Pi 3 / 4 / 5, arm64 edge boxes"},
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "amd64", Budget: mib(7.3), Board: "x86-64 edge boxes, containers"},
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "riscv64", Budget: mib(6.5), Board: "RISC-V boards"},
	{Binary: "tether-agent", Pkg: agentPkg, Tags: AgentTags, GOARCH: "mipsle", GOMIPS: "softfloat", Budget: mib(8.0), Board: "OpenWrt routers (MIPS, no FPU)"},
	{Binary: "tether-relay", Pkg: "./relay/cmd/tether-relay", GOARCH: "amd64", Budget: mib(22), Board: "servers"},
	{Binary: "tether-relay", Pkg: "./relay/cmd/tether-relay", GOARCH: "arm64", Budget: mib(20), Board: "servers"},
	{Binary: "tether-controlplane", Pkg: "./controlplane/cmd/tether-controlplane", GOARCH: "amd64", Budget: mib(11.5), Board: "servers"},
	{Binary: "tether-controlplane", Pkg: "./controlplane/cmd/tether-controlplane", GOARCH: "arm64", Budget: mib(10.5), Board: "servers"},
	{Binary: "tetherctl", Pkg: "./controlplane/cmd/tetherctl", GOARCH: "amd64", Budget: mib(7), Board: "operators"},
	{Binary: "tetherctl", Pkg: "./controlplane/cmd/tetherctl", GOARCH: "arm64", Budget: mib(6.5), Board: "operators"},
}

const agentPkg = "./agent/cmd/tether-agent"

// tools are built like the release binaries but not released: the
// bench's fleet simulator links the agent package, so it takes AgentTags.
var tools = []Target{
	{Binary: "tether-fleetsim", Pkg: "./agent/cmd/tether-fleetsim", Tags: AgentTags},
}

// Find returns the target for a binary and arch ("armv6", "arm64", ...).
func Find(binary, arch string) (Target, bool) {
	for _, t := range Targets {
		if t.Binary == binary && t.Arch() == arch {
			return t, true
		}
	}
	return Target{}, false
}

// Host returns the target that builds binary (a release binary or
// tether-fleetsim) for the machine running this code: the package and
// tags of its release targets, no size budget.
func Host(binary string) (Target, error) {
	for _, t := range append(Targets[:len(Targets):len(Targets)], tools...) {
		if t.Binary == binary {
			t.GOARCH, t.GOARM, t.GOMIPS = runtime.GOARCH, "", ""
			t.Budget, t.Board = 0, "this machine"
			return t, nil
		}
	}
	return Target{}, fmt.Errorf("cross: no binary named %q", binary)
}

// Options configures Build.
type Options struct {
	// OutDir receives the binaries and SHA256SUMS. Required.
	OutDir string
	// Version is stamped into main.version. Empty means "dev".
	Version string
	// Targets to build; nil means all.
	Targets []Target
	// Env is added to the go command's environment (e.g. GOCACHE).
	Env []string
	// Jobs is how many builds run at once. Zero means 2.
	Jobs int
	// Dir is the root of the module to build (e.g. a worktree of another
	// revision). Empty means the module of the working directory.
	Dir string
	// Bare names each binary by Target.Binary alone (tether-agent) instead
	// of Filename: for one platform's binaries, to run them here.
	Bare bool
}

// Result is one built binary.
type Result struct {
	Target
	Path   string
	Size   int64
	SHA256 string
}

// OverBudget reports whether the binary exceeds its target's budget.
func (r Result) OverBudget() bool { return r.Budget > 0 && r.Size > r.Budget }

// BudgetError lists the binaries that exceed their budgets.
type BudgetError struct{ Over []Result }

func (e *BudgetError) Error() string {
	var b strings.Builder
	b.WriteString("size budget exceeded:")
	for _, r := range e.Over {
		fmt.Fprintf(&b, "\n  %s is %d bytes (%.2f MiB), over its budget of %.2f MiB by %d bytes",
			r.Target, r.Size, float64(r.Size)/MiB, float64(r.Budget)/MiB, r.Size-r.Budget)
	}
	return b.String()
}

// Build compiles the targets (CGO_ENABLED=0, -trimpath, -s -w, version
// stamped), writes SHA256SUMS, and returns a *BudgetError when any binary
// exceeds its budget (the binaries are written all the same).
func Build(ctx context.Context, o Options) ([]Result, error) {
	if o.OutDir == "" {
		return nil, errors.New("cross: OutDir is required")
	}
	if o.Targets == nil {
		o.Targets = Targets
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	if o.Jobs <= 0 {
		o.Jobs = 2
	}
	root := o.Dir
	if root == "" {
		var err error
		if root, err = ModuleRoot(ctx); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}
	out, err := filepath.Abs(o.OutDir)
	if err != nil {
		return nil, err
	}
	results := make([]Result, len(o.Targets))
	errs := make([]error, len(o.Targets))
	sem := make(chan struct{}, o.Jobs)
	var wg sync.WaitGroup
	for i, t := range o.Targets {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i], errs[i] = build(ctx, root, out, o, t)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := writeSums(filepath.Join(out, "SHA256SUMS"), results); err != nil {
		return results, err
	}
	var over []Result
	for _, r := range results {
		if r.OverBudget() {
			over = append(over, r)
		}
	}
	if over != nil {
		return results, &BudgetError{Over: over}
	}
	return results, nil
}

func build(ctx context.Context, root, out string, o Options, t Target) (Result, error) {
	name := t.Filename()
	if o.Bare {
		name = t.Binary
	}
	path := filepath.Join(out, name)
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w -buildid= -X main.version=" + o.Version}
	if t.Tags != "" {
		args = append(args, "-tags", t.Tags)
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "-o", path, t.Pkg)...)
	cmd.Dir = root
	cmd.Env = append(t.goEnv(), o.Env...)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return Result{}, fmt.Errorf("build %s: %v\n%s", t, err, msg)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Result{}, err
	}
	sum := sha256.Sum256(data)
	return Result{Target: t, Path: path, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])}, nil
}

// goEnv is the go command's environment for building t.
func (t Target) goEnv() []string {
	env := append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+t.GOARCH, "GOTOOLCHAIN=local", "GOFLAGS=")
	if t.GOARM != "" {
		env = append(env, "GOARM="+t.GOARM)
	}
	if t.GOMIPS != "" {
		env = append(env, "GOMIPS="+t.GOMIPS)
	}
	return env
}

// writeSums writes a sha256sum(1)-compatible checksum file.
func writeSums(path string, rs []Result) error {
	sorted := append([]Result(nil), rs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Path < sorted[j].Path })
	var b bytes.Buffer
	for _, r := range sorted {
		fmt.Fprintf(&b, "%s  %s\n", r.SHA256, filepath.Base(r.Path))
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// ModuleRoot is the root directory of the tether module the working
// directory is in.
func ModuleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("find module root: not inside the tether module")
	}
	return filepath.Dir(mod), nil
}
