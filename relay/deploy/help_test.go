package deploy

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross/harness"
)

// spec is a binary's settings as its --help lists them: each TETHER_*
// variable and its default ("" for none, "(required)").
type spec map[string]string

// binaries maps a Dockerfile target to the binary its image runs.
var binaries = map[string]string{"relay": "tether-relay", "controlplane": "tether-controlplane", "agent": "tether-agent"}

var built struct {
	once  sync.Once
	dir   string
	specs map[string]spec
	err   error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// specs builds the binaries the release way (once per test run) and reads
// each one's settings from its --help: what the binary really takes.
func specs(t *testing.T) map[string]spec {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binaries to read their settings")
	}
	built.once.Do(func() {
		built.dir, built.err = os.MkdirTemp("", "tether-deploy-")
		if built.err != nil {
			return
		}
		ctx := context.Background()
		var names []string
		for _, b := range binaries {
			names = append(names, b)
		}
		if built.err = harness.Build(ctx, built.dir, names...); built.err != nil {
			return
		}
		built.specs = map[string]spec{}
		for _, b := range names {
			if built.specs[b], built.err = readHelp(filepath.Join(built.dir, b)); built.err != nil {
				return
			}
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.specs
}

func readHelp(bin string) (spec, error) {
	p, err := harness.Start(harness.Cmd{Path: bin, Args: []string{"--help"}})
	if err != nil {
		return nil, err
	}
	if err := p.WaitExit(30 * time.Second); err != nil {
		p.Stop(time.Second)
		return nil, err
	}
	if err := p.Err(); err != nil {
		return nil, fmt.Errorf("%s --help: %v\n%s", bin, err, p.Logs())
	}
	s, err := parseHelp(p.Stdout())
	if err != nil {
		return nil, fmt.Errorf("%s --help: %w", bin, err)
	}
	return s, nil
}

// parseHelp reads the settings table of --help: a header
// "FLAG ENVIRONMENT DEFAULT MEANING" and one aligned row per setting.
func parseHelp(out string) (spec, error) {
	s := spec{}
	var env, def, meaning int // column offsets, in runes
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := []rune(sc.Text())
		if env == 0 {
			text := string(line)
			if strings.HasPrefix(text, "FLAG") {
				env, def, meaning = column(text, "ENVIRONMENT"), column(text, "DEFAULT"), column(text, "MEANING")
				if env <= 0 || def <= env || meaning <= def {
					return nil, fmt.Errorf("header %q: want FLAG ENVIRONMENT DEFAULT MEANING", text)
				}
			}
			continue
		}
		if len(line) <= def {
			continue
		}
		name := strings.TrimSpace(string(line[env:def]))
		if !strings.HasPrefix(name, "TETHER_") {
			continue
		}
		s[name] = strings.TrimSpace(string(line[def:min(meaning, len(line))]))
	}
	if len(s) == 0 {
		return nil, fmt.Errorf("no settings table in:\n%s", out)
	}
	return s, nil
}

func column(header, name string) int {
	return len([]rune(header[:max(strings.Index(header, name), 0)]))
}

func TestParseHelp(t *testing.T) {
	out := `tether-x: a thing.

FLAG          ENVIRONMENT        DEFAULT         MEANING
--http-addr   TETHER_HTTP_ADDR   :8080           public plain-HTTP listener
--nats-url    TETHER_NATS_URL    (required)      NATS server(s) …
--tls-cert    TETHER_TLS_CERT                    certificate file (PEM); empty: a dev CA
--version                                        print the version and exit
`
	s, err := parseHelp(out)
	if err != nil {
		t.Fatal(err)
	}
	want := spec{"TETHER_HTTP_ADDR": ":8080", "TETHER_NATS_URL": "(required)", "TETHER_TLS_CERT": ""}
	if fmt.Sprint(s) != fmt.Sprint(want) {
		t.Fatalf("parseHelp: %v, want %v", s, want)
	}
}

// checkEnv reports every TETHER_* variable of env that the binary does not
// take (a renamed or misspelt setting), naming where it is.
func checkEnv(t *testing.T, where, binary string, known spec, env []string) {
	t.Helper()
	for _, k := range env {
		if !strings.HasPrefix(k, "TETHER_") {
			continue
		}
		if _, ok := known[k]; !ok {
			t.Errorf("%s: %s is no setting of %s (its --help lists %s)", where, k, binary, strings.Join(sortedKeys(known), " "))
		}
	}
}

// dockerStage is a stage of the Dockerfile: FROM ... AS name.
type dockerStage struct {
	name   string
	env    map[string]string
	expose []string
	volume []string
}

var fromRE = regexp.MustCompile(`(?i)^FROM\s+\S+\s+AS\s+(\S+)\s*$`)

// readDockerfile returns the Dockerfile's named stages.
func readDockerfile(t *testing.T) map[string]*dockerStage {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	stages := map[string]*dockerStage{}
	var cur *dockerStage
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if m := fromRE.FindStringSubmatch(line); m != nil {
			cur = &dockerStage{name: m[1], env: map[string]string{}}
			stages[m[1]] = cur
			continue
		}
		if cur == nil {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "ENV":
			for _, kv := range f[1:] {
				k, v, _ := strings.Cut(kv, "=")
				cur.env[k] = v
			}
		case "EXPOSE":
			cur.expose = append(cur.expose, f[1:]...)
		case "VOLUME":
			cur.volume = append(cur.volume, f[1:]...)
		}
	}
	if len(stages) == 0 {
		t.Fatal("Dockerfile: no FROM ... AS <target>")
	}
	return stages
}

// effective is what a container of target runs with: the binary's
// defaults, under the Dockerfile's ENV, under env.
func effective(s spec, stage *dockerStage, env map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range s {
		if v != "(required)" {
			out[k] = v
		}
	}
	if stage != nil {
		for k, v := range stage.env {
			out[k] = v
		}
	}
	for k, v := range env {
		out[k] = v
	}
	return out
}
