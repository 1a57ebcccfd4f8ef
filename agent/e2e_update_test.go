package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// The update tests run real tether-agent binaries, built here with
// different versions, as systemd would run them from the firmware's unit
// (ExecStartPre, ExecStart, Restart=always), against a relay whose control
// plane holds the releases and rollouts.

// buildAgent builds tether-agent at version for goarch/goarm (release
// flags, cross.AgentTags) into dir and returns it. crash sets the
// test-only knob main.crashAtStart: the binary exits 1 at once.
func buildAgent(t *testing.T, dir, version, goarch, goarm string, crash bool) []byte {
	t.Helper()
	root, err := cross.ModuleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ldflags := "-s -w -buildid= -X main.version=" + version
	if crash {
		ldflags += " -X main.crashAtStart=yes"
	}
	out := filepath.Join(dir, "tether-agent-"+version+"-"+goarch+goarm)
	cmd := exec.CommandContext(t.Context(), "go", "build", "-trimpath", "-buildvcs=false", "-tags", cross.AgentTags, "-ldflags", ldflags, "-o", out, "./agent/cmd/tether-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+goarch, "GOARM="+goarm, "GOTOOLCHAIN=local", "GOFLAGS=")
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent %s: %v\n%s", version, err, msg)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hostAgents builds the agent for this machine at each version (one
// ending in "!" is built to crash at start, and named without the "!")
// and returns them by version, with this machine's arch as manifests name
// it.
func hostAgents(t *testing.T, versions ...string) (string, map[string][]byte) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("the agent updates itself on Linux")
	}
	dir := t.TempDir()
	out := map[string][]byte{}
	for _, v := range versions {
		name := strings.TrimSuffix(v, "!")
		out[name] = buildAgent(t, dir, name, runtime.GOARCH, "7", name != v)
	}
	return cross.Target{GOARCH: runtime.GOARCH, GOARM: "7"}.Arch(), out
}

// publish signs and publishes a release of binaries (by arch) on e's
// control plane and rolls it out to every device.
func publish(t *testing.T, e *relaytest.Env, key controlplanetest.ReleaseKey, version string, binaries map[string][]byte) {
	t.Helper()
	manifest, sig := key.Sign(t, controlplanetest.Manifest(version, binaries))
	ctx := t.Context()
	if _, err := e.CP.Releases.Publish(ctx, manifest, sig); err != nil {
		t.Fatalf("publish %s: %v", version, err)
	}
	for arch, b := range binaries {
		if _, err := e.CP.Releases.PutArtifact(ctx, version, arch, bytes.NewReader(b)); err != nil {
			t.Fatalf("upload %s %s: %v", version, arch, err)
		}
	}
	if _, err := e.CP.Releases.Start(ctx, version, nil, 100); err != nil {
		t.Fatalf("roll out %s: %v", version, err)
	}
}

// updateEnv starts a relay that offers the control plane's rollouts,
// asking every second; the control plane trusts keys.
func updateEnv(t *testing.T, keys release.Keys) *relaytest.Env {
	return relaytest.Start(t, relaytest.Options{ReleaseKeys: keys, RelayConfig: func(c *relay.Config) {
		c.Releases = c.ControlPlane.(controlplane.Releases)
		c.UpdateInterval = time.Second
	}})
}

// report waits until the control plane's latest report of device name on
// version says state, and returns it.
func report(t *testing.T, e *relaytest.Env, name, version, state string, within time.Duration, watch func() error) controlplane.UpdateReport {
	t.Helper()
	var got controlplane.UpdateReport
	err := harness.Poll(t.Context(), within, func() error {
		if err := watch(); err != nil {
			return err
		}
		dev, err := e.CP.Store.Device(context.Background(), name)
		if err != nil {
			return err
		}
		rs, err := e.CP.Store.UpdateReports(context.Background(), version)
		if err != nil {
			return err
		}
		got = rs[dev.ID]
		if got.State != state {
			return fmt.Errorf("%s on %s: report %+v, want %s", name, version, got, state)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// device is a device's file system: the binary's directory as the
// firmware installs it (/opt/tether-agent) and the state dir.
type device struct {
	dir, state string
}

func (d device) bin() string { return filepath.Join(d.dir, "tether-agent") }

// version runs the device's binary with --version (through wrap, e.g.
// qemu-user, if set).
func (d device) version(t *testing.T, path string, wrap ...string) string {
	t.Helper()
	args := append(slices.Clone(wrap), path, "--version")
	out, err := exec.CommandContext(t.Context(), args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", path, err, out)
	}
	return strings.TrimSpace(string(out))
}

func (d device) wantVersion(t *testing.T, path, version string, wrap ...string) {
	t.Helper()
	if got := d.version(t, path, wrap...); !strings.Contains(got, version) {
		t.Fatalf("%s is %q, want %s", path, got, version)
	}
}

// unitCommands reads the firmware's systemd unit: its ExecStartPre and
// ExecStart command lines, /opt/tether-agent made dir, and whether each
// may fail ("-").
type unitCommand struct {
	args     []string
	mayFail  bool
	isMain   bool
	original string
}

func unitCommands(t *testing.T, dir string) []unitCommand {
	t.Helper()
	root, err := cross.ModuleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(filepath.Join(root, "firmware", "tether-agent.service"))
	if err != nil {
		t.Fatal(err)
	}
	var out []unitCommand
	for line := range strings.SplitSeq(string(unit), "\n") {
		key, val, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || (key != "ExecStartPre" && key != "ExecStart") {
			continue
		}
		c := unitCommand{isMain: key == "ExecStart", original: val}
		for len(val) > 0 && strings.ContainsRune("-+!@:", rune(val[0])) {
			c.mayFail = c.mayFail || val[0] == '-'
			val = val[1:]
		}
		c.args = strings.Fields(strings.ReplaceAll(val, "/opt/tether-agent", dir))
		out = append(out, c)
	}
	if len(out) == 0 || !out[len(out)-1].isMain {
		t.Fatalf("no ExecStart in the unit:\n%s", unit)
	}
	return out
}

// supervisor runs a device's agent as the firmware's unit tells systemd
// to: each ExecStartPre (a missing binary is fine with "-"), then
// ExecStart; on exit, again (Restart=always), but not after status 3 or
// 4 (RestartPreventExitStatus). It stops when the test ends, or after
// maxStarts starts.
type supervisor struct {
	t      *testing.T
	cmds   []unitCommand
	env    []string
	wrap   []string // e.g. qemu-user before each binary
	logs   *harness.SyncBuffer
	mu     sync.Mutex
	cur    *harness.Proc
	starts atomic.Int32
	stop   chan struct{}
	done   chan struct{}
}

const maxStarts = 40

func supervise(t *testing.T, d device, env []string, wrap ...string) *supervisor {
	s := &supervisor{t: t, cmds: unitCommands(t, d.dir), env: env, wrap: wrap, logs: &harness.SyncBuffer{},
		stop: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	t.Cleanup(func() {
		close(s.stop)
		s.mu.Lock()
		if s.cur != nil {
			s.cur.Stop(harness.StopGrace)
		}
		s.mu.Unlock()
		<-s.done
		if t.Failed() {
			t.Logf("device logs:\n%s", s.logs.String())
		}
	})
	return s
}

func (s *supervisor) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

func (s *supervisor) run() {
	defer close(s.done)
	for s.starts.Load() < maxStarts && !s.stopped() {
		fmt.Fprintf(s.logs, "--- start %d\n", s.starts.Add(1))
		for _, c := range s.cmds {
			if _, err := os.Stat(c.args[0]); errors.Is(err, fs.ErrNotExist) && c.mayFail {
				continue
			}
			args := append(slices.Clone(s.wrap), c.args...)
			p, err := harness.Start(harness.Cmd{Path: args[0], Args: args[1:], Env: s.env, Stdout: s.logs, Stderr: s.logs})
			if err != nil {
				fmt.Fprintf(s.logs, "--- %s: %v\n", c.original, err)
				break
			}
			s.mu.Lock()
			s.cur = p
			s.mu.Unlock()
			if s.stopped() {
				p.Stop(harness.StopGrace)
				return
			}
			<-p.Done()
			code := p.ExitCode()
			fmt.Fprintf(s.logs, "--- %s exited %d\n", c.original, code)
			if c.isMain && (code == 3 || code == 4) {
				return
			}
			if code != 0 && !c.mayFail {
				break
			}
		}
	}
}

// running returns the agent process running now (nil between starts).
func (s *supervisor) running() *harness.Proc {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || s.cur.Exited() {
		return nil
	}
	return s.cur
}

// alive fails once the supervisor gave up.
func (s *supervisor) alive() error {
	select {
	case <-s.done:
		return fmt.Errorf("the agent stopped being restarted after %d starts", s.starts.Load())
	default:
		return nil
	}
}

// newDevice installs binary as the device's agent.
func newDevice(t *testing.T, binary []byte) device {
	t.Helper()
	d := device{dir: filepath.Join(t.TempDir(), "opt", "tether-agent"), state: t.TempDir()}
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.bin(), binary, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// deviceEnv is the agent's environment (as /etc/tether/agent.env would
// hold it) for e's relay.
func deviceEnv(t *testing.T, e *relaytest.Env, d device, name, keys string, web string, extra ...string) []string {
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, e.CA.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return append([]string{
		"TETHER_RELAY_URL=" + e.RelayURL(), "TETHER_RELAY_CA=" + caFile, "TETHER_ENROLL_TOKEN=" + e.Token(1),
		"TETHER_DEVICE_NAME=" + name, "TETHER_STATE_DIR=" + d.state, "TETHER_SERVICES=web=" + web,
		"TETHER_RELEASE_KEYS=" + keys, "TETHER_HEARTBEAT_INTERVAL=1s", "TETHER_LOG_FORMAT=text",
		"TETHER_UPDATE_RATE=16777216",
		"TETHER_BOOT_DIRS=" + t.TempDir(),
	}, extra...)
}

// webServer is a device's local web service.
func webServer(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	t.Cleanup(srv.Close)
	return srv.URL
}

// serves checks that the device's web service answers through the relay.
func serves(e *relaytest.Env, name string) error {
	host := "web-" + name + ".localhost"
	code, body := e.Get(true, host, "/")
	if code != 200 || body != "hello" {
		return fmt.Errorf("GET https://%s/: %d %q", host, code, body)
	}
	return nil
}

// TestUpdateEndToEnd: a v1 agent is updated to v2 (healthy); a v3 that
// crashes at start rolls back to v2 (by preflight, as systemd runs it);
// a release signed by a key the agent does not trust is refused; a binary
// whose hash is not the manifest's fails and changes nothing; a rollout
// of an older release does not downgrade it.
func TestUpdateEndToEnd(t *testing.T) {
	arch, bins := hostAgents(t, "v1.0.0", "v2.0.0", "v3.0.0!", "v4.0.0")
	v1, v2, v3, v4 := bins["v1.0.0"], bins["v2.0.0"], bins["v3.0.0"], bins["v4.0.0"]
	key, other := controlplanetest.NewReleaseKey(t), controlplanetest.NewReleaseKey(t)
	// The control plane trusts both keys; the agent only the first.
	e := updateEnv(t, append(slices.Clone(key.Keys), other.Keys...))
	d := newDevice(t, v1)
	sup := supervise(t, d, deviceEnv(t, e, d, "ota", key.Public, webServer(t)))
	alive := func() error { return firstErr(sup.alive(), serves(e, "ota")) }

	// v1 → v2.
	if err := harness.Poll(t.Context(), 60*time.Second, alive); err != nil {
		t.Fatal(err)
	}
	publish(t, e, key, "v2.0.0", map[string][]byte{arch: v2})
	report(t, e, "ota", "v2.0.0", frames.UpdateHealthy, 60*time.Second, sup.alive)
	d.wantVersion(t, d.bin(), "v2.0.0")
	d.wantVersion(t, d.bin()+".prev", "v1.0.0")
	if err := harness.Poll(t.Context(), 30*time.Second, alive); err != nil {
		t.Fatal(err)
	}

	// v3 cannot start: systemd restarts it, preflight (run from v2, its
	// .prev) counts the starts and puts v2 back.
	publish(t, e, key, "v3.0.0", map[string][]byte{arch: v3})
	r := report(t, e, "ota", "v3.0.0", frames.UpdateRolledBack, 90*time.Second, sup.alive)
	if !strings.Contains(r.Reason, "starts") {
		t.Errorf("rolled back because %q", r.Reason)
	}
	d.wantVersion(t, d.bin(), "v2.0.0")
	if err := harness.Poll(t.Context(), 30*time.Second, alive); err != nil {
		t.Fatal(err)
	}

	// Signed by a key the control plane trusts, but not the agent.
	publish(t, e, other, "v4.0.0", map[string][]byte{arch: v4})
	r = report(t, e, "ota", "v4.0.0", frames.UpdateRefused, 60*time.Second, sup.alive)
	if !strings.Contains(r.Reason, "not signed by a trusted release key") {
		t.Errorf("refused because %q", r.Reason)
	}

	// The control plane's copy of the binary is not what was signed.
	publish(t, e, key, "v4.0.1", map[string][]byte{arch: v4})
	tamper(t, e, v4)
	r = report(t, e, "ota", "v4.0.1", frames.UpdateFailed, 60*time.Second, sup.alive)
	if !strings.Contains(r.Reason, "sha256") {
		t.Errorf("failed because %q", r.Reason)
	}
	d.wantVersion(t, d.bin(), "v2.0.0")

	// An older release is never offered, and never taken. The relay asks
	// every second (±50%): over 5s the device hears of v1.5.0 at least
	// three times if it is offered at all, and would report on it.
	publish(t, e, key, "v1.5.0", map[string][]byte{arch: v1})
	window := time.Now().Add(5 * time.Second)
	err := harness.Poll(t.Context(), 10*time.Second, func() error {
		if err := alive(); err != nil {
			return err
		}
		if rs, _ := e.CP.Store.UpdateReports(context.Background(), "v1.5.0"); len(rs) != 0 {
			return fmt.Errorf("reports on a downgrade: %v", rs)
		}
		if time.Now().Before(window) {
			return errors.New("watching the device for 5s")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if rs, _ := e.CP.Store.UpdateReports(context.Background(), "v1.5.0"); len(rs) != 0 {
		t.Errorf("reports on a downgrade: %v", rs)
	}
	d.wantVersion(t, d.bin(), "v2.0.0")
	if n := sup.starts.Load(); n > 12 {
		t.Errorf("%d starts", n)
	}
}

// firstErr is the first of errs that is not nil.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// tamper flips a byte in the control plane's stored copy of binary.
func tamper(t *testing.T, e *relaytest.Env, binary []byte) {
	t.Helper()
	var found []string
	filepath.WalkDir(e.DataDir, func(path string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return nil
		}
		if b, err := os.ReadFile(path); err == nil && bytes.Equal(b, binary) {
			found = append(found, path)
		}
		return nil
	})
	if len(found) == 0 {
		t.Fatal("the control plane's copy of the binary was not found")
	}
	for _, path := range found {
		b := slices.Clone(binary)
		b[len(b)/2] ^= 0xff
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// pauser drives the agent's test-only pause hook (TETHERTEST_UPDATE_PAUSE):
// two named pipes the test holds open.
type pauser struct {
	dir           string
	steps, resume *os.File
	lines         *bufio.Reader
}

func newPauser(t *testing.T) *pauser {
	t.Helper()
	p := &pauser{dir: t.TempDir()}
	for _, name := range []string{"steps", "resume"} {
		if err := syscall.Mkfifo(filepath.Join(p.dir, name), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	// Read-write: opening never blocks, and the pipes outlive the agent.
	if p.steps, err = os.OpenFile(filepath.Join(p.dir, "steps"), os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	if p.resume, err = os.OpenFile(filepath.Join(p.dir, "resume"), os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.steps.Close(); p.resume.Close() })
	p.lines = bufio.NewReader(p.steps)
	return p
}

// next returns the step the agent paused at.
func (p *pauser) next(within time.Duration) (string, error) {
	p.steps.SetReadDeadline(time.Now().Add(within))
	line, err := p.lines.ReadString('\n')
	return strings.TrimSpace(line), err
}

func (p *pauser) goOn() error {
	_, err := p.resume.Write([]byte{1})
	return err
}

// TestUpdateKilledAtEachStep: the power goes (kill -9) at each step of the
// swap; the next start runs a good binary, which comes back online and
// ends up on v2 (or stays on v1, having reported the interrupted update).
func TestUpdateKilledAtEachStep(t *testing.T) {
	arch, bins := hostAgents(t, "v1.0.0", "v2.0.0")
	v1, v2 := bins["v1.0.0"], bins["v2.0.0"]
	key := controlplanetest.NewReleaseKey(t)
	e := updateEnv(t, key.Keys)
	publish(t, e, key, "v2.0.0", map[string][]byte{arch: v2})
	for _, step := range []string{"written", "linked", "pending", "swapped"} {
		t.Run(step, func(t *testing.T) {
			d := newDevice(t, v1)
			p := newPauser(t)
			name := "kill-" + step
			sup := supervise(t, d, deviceEnv(t, e, d, name, key.Public, webServer(t), "TETHERTEST_UPDATE_PAUSE="+p.dir))
			for {
				got, err := p.next(60 * time.Second)
				if err != nil {
					t.Fatalf("waiting for step %s: %v", step, err)
				}
				if got == step {
					break
				}
				if err := p.goOn(); err != nil {
					t.Fatal(err)
				}
			}
			proc := sup.running()
			if proc == nil {
				t.Fatal("no agent running at the pause")
			}
			proc.Signal(syscall.SIGKILL)
			<-proc.Done()
			// From here on, every pause goes on at once.
			ctx, cancel := context.WithCancel(t.Context())
			var wg sync.WaitGroup
			wg.Go(func() {
				for ctx.Err() == nil {
					if _, err := p.next(200 * time.Millisecond); err == nil {
						p.goOn()
					}
				}
			})
			defer wg.Wait()
			defer cancel()
			got := d.version(t, d.bin())
			if !strings.Contains(got, "v1.0.0") && !strings.Contains(got, "v2.0.0") {
				t.Fatalf("after the cut the binary is %q", got)
			}
			want := frames.UpdateHealthy
			if step == "pending" {
				want = frames.UpdateFailed // v1 runs and reports the swap that never happened
			}
			report(t, e, name, "v2.0.0", want, 90*time.Second, sup.alive)
			if err := harness.Poll(t.Context(), 60*time.Second, func() error { return firstErr(sup.alive(), serves(e, name)) }); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestUpdateQEMU: the armv7 agent, under qemu-user, takes an update to
// v2 and reports it healthy. Without binfmt_misc the host cannot exec an
// ARM binary, so the re-exec after the swap fails and the agent exits;
// systemd (here the supervisor) starts the new binary, as it would after
// any exit. make test installs qemu-user-static; CI must have it.
func TestUpdateQEMU(t *testing.T) {
	qemu, err := exec.LookPath("qemu-arm-static")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-arm-static is missing on CI (make test installs qemu-user-static)")
		}
		t.Skip("qemu-arm-static not installed (make test installs qemu-user-static)")
	}
	bins := t.TempDir()
	v1 := buildAgent(t, bins, "v1.0.0", "arm", "7", false)
	v2 := buildAgent(t, bins, "v2.0.0", "arm", "7", false)
	key := controlplanetest.NewReleaseKey(t)
	e := updateEnv(t, key.Keys)
	d := newDevice(t, v1)
	sup := supervise(t, d, deviceEnv(t, e, d, "armv7", key.Public, webServer(t)), qemu)
	if err := harness.Poll(t.Context(), 120*time.Second, func() error { return firstErr(sup.alive(), serves(e, "armv7")) }); err != nil {
		t.Fatal(err)
	}
	publish(t, e, key, "v2.0.0", map[string][]byte{"armv7": v2})
	report(t, e, "armv7", "v2.0.0", frames.UpdateHealthy, 180*time.Second, sup.alive)
	d.wantVersion(t, d.bin(), "v2.0.0", qemu)
	d.wantVersion(t, d.bin()+".prev", "v1.0.0", qemu)
	if err := harness.Poll(t.Context(), 60*time.Second, func() error { return firstErr(sup.alive(), serves(e, "armv7")) }); err != nil {
		t.Fatal(err)
	}
}

// TestUpdateWatchdogRollsBack: a new version that does not become healthy
// (connected, two heartbeats acknowledged) within TETHER_UPDATE_DEADLINE
// is rolled back by the agent itself, without systemd's help: here the
// deadline (1s) is shorter than two heartbeat intervals.
func TestUpdateWatchdogRollsBack(t *testing.T) {
	arch, bins := hostAgents(t, "v1.0.0", "v2.0.0")
	v1, v2 := bins["v1.0.0"], bins["v2.0.0"]
	key := controlplanetest.NewReleaseKey(t)
	e := updateEnv(t, key.Keys)
	d := newDevice(t, v1)
	sup := supervise(t, d, deviceEnv(t, e, d, "watchdog", key.Public, webServer(t), "TETHER_UPDATE_DEADLINE=1s"))
	publish(t, e, key, "v2.0.0", map[string][]byte{arch: v2})
	r := report(t, e, "watchdog", "v2.0.0", frames.UpdateRolledBack, 90*time.Second, sup.alive)
	if !strings.Contains(r.Reason, "not healthy") {
		t.Errorf("rolled back because %q", r.Reason)
	}
	d.wantVersion(t, d.bin(), "v1.0.0")
	if err := harness.Poll(t.Context(), 60*time.Second, func() error { return firstErr(sup.alive(), serves(e, "watchdog")) }); err != nil {
		t.Fatal(err)
	}
	if n := sup.starts.Load(); n != 1 {
		t.Errorf("%d starts: the rollback should have needed no restart", n)
	}
}

// TestUpdateDownloadResumes: a download cut by the agent's death (kill -9)
// continues from the bytes already on disk once it is offered again, and
// one cut by the relay's continues on the next session, in the same
// process, from where it stopped.
func TestUpdateDownloadResumes(t *testing.T) {
	arch, bins := hostAgents(t, "v1.0.0", "v2.0.0", "v4.0.0")
	key := controlplanetest.NewReleaseKey(t)
	e := updateEnv(t, key.Keys)
	d := newDevice(t, bins["v1.0.0"])
	// 1 MiB/s: a binary of some 7 MiB takes seconds to come.
	sup := supervise(t, d, deviceEnv(t, e, d, "resume", key.Public, webServer(t), "TETHER_UPDATE_RATE=1048576"))
	alive := func() error { return firstErr(sup.alive(), serves(e, "resume")) }
	if err := harness.Poll(t.Context(), 60*time.Second, alive); err != nil {
		t.Fatal(err)
	}
	partial := func() error {
		fi, err := os.Stat(d.bin() + ".new")
		if err != nil || fi.Size() < 1<<20 {
			return fmt.Errorf("download not 1 MiB in yet (%v)", err)
		}
		return nil
	}

	publish(t, e, key, "v2.0.0", map[string][]byte{arch: bins["v2.0.0"]})
	if err := harness.Poll(t.Context(), 60*time.Second, partial); err != nil {
		t.Fatal(err)
	}
	proc := sup.running()
	if proc == nil {
		t.Fatal("no agent running")
	}
	proc.Signal(syscall.SIGKILL)
	report(t, e, "resume", "v2.0.0", frames.UpdateHealthy, 90*time.Second, sup.alive)
	if !strings.Contains(sup.logs.String(), "agent update download resumes") {
		t.Error("the restarted agent downloaded from the start")
	}

	publish(t, e, key, "v4.0.0", map[string][]byte{arch: bins["v4.0.0"]})
	if err := harness.Poll(t.Context(), 60*time.Second, partial); err != nil {
		t.Fatal(err)
	}
	starts := sup.starts.Load()
	e.KillRelay()
	e.StartRelay()
	report(t, e, "resume", "v4.0.0", frames.UpdateHealthy, 90*time.Second, sup.alive)
	if !strings.Contains(sup.logs.String(), "agent update download interrupted; resuming") {
		t.Error("no download was resumed on the next session")
	}
	if n := sup.starts.Load(); n != starts {
		t.Errorf("the agent restarted %d times while the relay was away", n-starts)
	}
	d.wantVersion(t, d.bin(), "v4.0.0")
	if err := harness.Poll(t.Context(), 60*time.Second, alive); err != nil {
		t.Fatal(err)
	}
}
