package cross

import (
	"context"
	"debug/buildinfo"
	"debug/elf"
	"debug/gosym"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
)

// Dep is an import path a binary must not link, and why.
type Dep struct {
	// Path covers the package and every package below it (Path/...). A
	// Path ending in "/" covers every import path that starts with it:
	// "github.com/nats-io/" is every NATS module.
	Path string
	// Why is the reason, stated in every failure.
	Why string
}

// AgentForbidden is what the agent must never link, each entry with its
// reason. The tests of this package check it twice: against the agent's
// package graph (go list -deps, for every agent target) and against the
// built binary itself. net/http and coder/websocket are allowed: the agent
// dials its relay with them.
var AgentForbidden = []Dep{
	{"go.etcd.io/bbolt", "durable state belongs to the control plane and the relays; a device keeps one key file"},
	{"github.com/nats-io/", "NATS is the bus between relays and the control plane; an agent speaks only to a relay, over its wss session"},
	{"github.com/prometheus/", "the agent carries no Prometheus client: it reports its figures to the relay over the control stream"},
	{"testing", "test code must not ship to devices"},
	{"github.com/tetherfleet/tether/controlplane", "server code: the agent reaches the control plane only through a relay (and it would drag in bbolt and NATS)"},
	{"github.com/tetherfleet/tether/relay", "server code: the agent shares only frames/ with the relay (which would drag in NATS, Prometheus and bbolt)"},
}

// Covers reports whether the import path pkg is one d forbids.
func (d Dep) Covers(pkg string) bool {
	if strings.HasSuffix(d.Path, "/") {
		return strings.HasPrefix(pkg, d.Path)
	}
	return pkg == d.Path || strings.HasPrefix(pkg, d.Path+"/")
}

// Violation is a Dep that a binary links, with the paths it covers.
type Violation struct {
	Dep
	Linked []string
}

func (v Violation) Error() string {
	more := ""
	if n := len(v.Linked) - 1; n > 0 {
		more = fmt.Sprintf(" (and %d more)", n)
	}
	return fmt.Sprintf("links %s%s, forbidden because %s", v.Linked[0], more, v.Why)
}

// Forbidden returns the entries of table that cover one of pkgs.
func Forbidden(table []Dep, pkgs []string) []Violation {
	var out []Violation
	for _, d := range table {
		v := Violation{Dep: d}
		for _, p := range pkgs {
			if d.Covers(p) && !slices.Contains(v.Linked, p) {
				v.Linked = append(v.Linked, p)
			}
		}
		if v.Linked != nil {
			out = append(out, v)
		}
	}
	return out
}

// ListDeps returns the import paths t's package links on its platform with
// its tags, as go list -deps reports them. root is the module's root.
func ListDeps(ctx context.Context, root string, t Target) ([]string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-deps", "-tags", t.Tags, t.Pkg)
	cmd.Dir = root
	cmd.Env = t.goEnv()
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w\n%s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("go list -deps %s: %w", t, err)
	}
	return strings.Fields(string(out)), nil
}

// Linked is what a built Go binary contains.
type Linked struct {
	// Modules are the dependency modules, as go version -m lists them.
	Modules []string
	// Packages are the packages that have a function in the binary, read
	// from the function table the runtime keeps for tracebacks (it
	// survives -s -w).
	Packages []string
}

// ReadLinked reads the modules and packages of the Go binary at path (ELF).
func ReadLinked(path string) (Linked, error) {
	var l Linked
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return l, err
	}
	for _, m := range bi.Deps {
		l.Modules = append(l.Modules, m.Path)
	}
	f, err := elf.Open(path)
	if err != nil {
		return l, err
	}
	defer f.Close()
	pcln, text := f.Section(".gopclntab"), f.Section(".text")
	if pcln == nil || text == nil {
		return l, fmt.Errorf("%s: no .gopclntab or .text section", path)
	}
	data, err := pcln.Data()
	if err != nil {
		return l, err
	}
	tab, err := gosym.NewTable(nil, gosym.NewLineTable(data, text.Addr))
	if err != nil {
		return l, fmt.Errorf("%s: function table: %w", path, err)
	}
	seen := map[string]bool{}
	for _, fn := range tab.Funcs {
		if p := fn.PackageName(); p != "" && !seen[p] {
			seen[p] = true
			l.Packages = append(l.Packages, p)
		}
	}
	slices.Sort(l.Packages)
	return l, nil
}
