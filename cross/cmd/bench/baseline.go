package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/tetherfleet/tether/cross"
)

// defaultBaseline is the revision whose agent the current one is measured
// against when -baseline-agent is not given: the parent of the newest
// commit that deleted frames/wsmux/client.go, the hand-written WebSocket
// client that coder/websocket replaced; HEAD when there is none.
func defaultBaseline(ctx context.Context) string {
	cmd := exec.CommandContext(ctx, "git", "log", "-1", "--format=%H", "--diff-filter=D", "--", "frames/wsmux/client.go")
	if root, err := cross.ModuleRoot(ctx); err == nil {
		cmd.Dir = root
	}
	out, err := cmd.Output()
	if h := strings.TrimSpace(string(out)); err == nil && h != "" {
		return h + "^"
	}
	return "HEAD"
}

// buildBaseline builds the agent of revision rev into dir, for this
// machine and for linux/arm64, from a git archive of that revision and
// with the build tags of that revision's own Makefile. The sources are
// removed afterwards; the binaries stay in dir.
func buildBaseline(ctx context.Context, rev, dir string) (*agentRun, error) {
	root, err := cross.ModuleRoot(ctx)
	if err != nil {
		return nil, err
	}
	git := func(args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, ee.Stderr)
		}
		return strings.TrimSpace(string(out)), err
	}
	hash, err := git("rev-parse", "--short", rev+"^{commit}")
	if err != nil {
		return nil, err
	}
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(src)
	tarball := filepath.Join(dir, "src.tar")
	if _, err := git("archive", "--format=tar", "-o", tarball, hash); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "tar", "-xf", tarball, "-C", src).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("unpack %s: %v: %s", hash, err, out)
	}
	os.Remove(tarball)

	tags := ""
	if mk, err := os.ReadFile(filepath.Join(src, "Makefile")); err == nil {
		for _, b := range cross.GoBuilds(mk) {
			if b.Builds("./agent/cmd/tether-agent") {
				tags = b.Tags
				break
			}
		}
	}
	log.Printf("building the baseline agent of %s (%s), tags %q", rev, hash, tags)
	host, err := cross.Host("tether-agent")
	if err != nil {
		return nil, err
	}
	arm64, _ := cross.Find("tether-agent", "arm64")
	host.Tags, arm64.Tags, arm64.Budget = tags, tags, 0
	targets := []cross.Target{host, arm64}
	if host.Arch() == arm64.Arch() {
		targets = targets[:1]
	}
	rs, err := cross.Build(ctx, cross.Options{Dir: src, OutDir: dir, Version: hash, Targets: targets,
		Env: []string{"GOPROXY=off"}}) // its modules are in the cache; never the network
	if err != nil {
		return nil, err
	}
	return &agentRun{label: "baseline", rev: fmt.Sprintf("%s (%s)", hash, rev), path: rs[0].Path, arm64: rs[len(rs)-1].Size, device: "bench-base"}, nil
}
