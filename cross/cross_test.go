package cross

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/relay/relaytest"
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
	if r.Budget != 5*MiB {
		t.Fatalf("the arm64 agent's budget is %d, the issue fixes 5.0 MiB", r.Budget)
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

// TestAgentBinaryDeps reads the built binary itself: its module list and
// the package names in its symbol table (kept for tracebacks even when
// stripped).
func TestAgentBinaryDeps(t *testing.T) {
	r := agentBinary(t, "arm64")
	mods, err := exec.Command("go", "version", "-m", r.Path).Output()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(r.Path)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"go.etcd.io/bbolt", "github.com/nats-io/", "github.com/prometheus/", "github.com/coder/websocket"} {
		if bytes.Contains(mods, []byte(bad)) || bytes.Contains(data, []byte(bad)) {
			t.Errorf("the agent binary contains %s", bad)
		}
	}
	for _, sym := range []string{"testing.tRunner", "net/http.(*Transport)", "regexp.Compile"} {
		if bytes.Contains(data, []byte(sym)) {
			t.Errorf("the agent binary contains %s", sym)
		}
	}
	if !bytes.Contains(mods, []byte("github.com/xtaci/smux")) {
		t.Error("go version -m lists no smux: the check reads the wrong thing")
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

// TestQEMUSmoke runs the armv6 and arm64 agents under qemu-user against a
// relay on loopback: each enrolls and serves one HTTP request through the
// tunnel. make test installs qemu-user-static; CI must have it.
func TestQEMUSmoke(t *testing.T) {
	emulators := map[string]string{"armv6": "qemu-arm-static", "arm64": "qemu-aarch64-static"}
	for arch, emu := range emulators {
		t.Run(arch, func(t *testing.T) {
			bin := agentBinary(t, arch)
			qemu, err := exec.LookPath(emu)
			if err != nil {
				if os.Getenv("CI") != "" {
					t.Fatalf("%s is missing on CI (make test installs qemu-user-static)", emu)
				}
				t.Skipf("%s not installed (make test installs qemu-user-static)", emu)
			}
			e := relaytest.Start(t, relaytest.Options{})
			web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fmt.Fprintf(w, "served by the %s agent", arch)
			}))
			defer web.Close()
			caFile := filepath.Join(t.TempDir(), "ca.pem")
			os.WriteFile(caFile, e.CA.CertPEM, 0o644)
			cmd := exec.Command(qemu, bin.Path)
			cmd.Env = append(os.Environ(), "TETHER_RELAY_URL="+e.RelayURL(), "TETHER_RELAY_CA="+caFile,
				"TETHER_ENROLL_TOKEN="+e.Token(1), "TETHER_DEVICE_NAME=pi-"+arch, "TETHER_STATE_DIR="+t.TempDir(),
				"TETHER_SERVICES=web="+web.URL, "TETHER_LOG_FORMAT=text")
			var logs bytes.Buffer
			cmd.Stderr = &logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				cmd.Process.Signal(os.Interrupt)
				cmd.Wait()
				if t.Failed() {
					t.Logf("agent log:\n%s", logs.String())
				}
			}()
			host := "web-pi-" + arch + ".localhost"
			relaytest.Eventually(t, 60*time.Second, func() error {
				code, body := e.Get(true, host, "/")
				if code != 200 || body != "served by the "+arch+" agent" {
					return fmt.Errorf("GET https://%s/: %d %q", host, code, body)
				}
				return nil
			})
		})
	}
}
