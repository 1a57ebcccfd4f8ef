package main_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestContract builds the four binaries and uses them as an operator would:
// only environment variables, tetherctl, HTTP and TCP.
func TestContract(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin := buildBinaries(t)
	top := t          // processes live until the whole test ends
	var procs []*proc // every process started, for the log checks
	start := func(t *testing.T, bin, name string, env ...string) *proc {
		p := startProc(t, top, bin, name, env...)
		procs = append(procs, p)
		return p
	}
	data := t.TempDir()
	ports := relaytest.FreePortRange(t, 8)
	addr := map[string]string{"https": freeAddr(t), "http": freeAddr(t), "ops": freeAddr(t), "admin": freeAddr(t)}
	relayEnv := []string{
		"TETHER_DATA_DIR=" + data, "TETHER_HTTPS_ADDR=" + addr["https"], "TETHER_HTTP_ADDR=" + addr["http"],
		"TETHER_OPS_ADDR=" + addr["ops"], "TETHER_ADMIN_ADDR=" + addr["admin"], "TETHER_TCP_HOST=127.0.0.1",
		"TETHER_TCP_PORTS=" + ports.String(), "TETHER_RELAY_ID=relay-1", "TETHER_DRAIN_WINDOW=500ms", "TETHER_LOG_FORMAT=json",
	}
	ctlEnv := []string{"TETHER_ADMIN_URL=http://" + addr["admin"], "TETHER_ADMIN_TOKEN_FILE=" + filepath.Join(data, "admin-token")}

	relay := start(t, bin, "tether-relay", relayEnv...)
	waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200)
	if !strings.Contains(relay.stdout(), "Admin token (shown once") {
		t.Fatalf("relay did not print the generated admin token: %s", relay.stdout())
	}

	out := ctl(t, bin, ctlEnv, "token", "create", "--uses", "5", "--ttl", "1h", "--label", "site=lab")
	token := strings.TrimSpace(out)
	if !strings.HasPrefix(token, "tth_") {
		t.Fatalf("token create printed %q", out)
	}

	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "web on pi01 via %s", r.Header.Get("X-Forwarded-Proto"))
	}))
	defer web.Close()
	ssh := relaytest.LineService(t)
	state := t.TempDir()
	agentEnv := []string{
		"TETHER_RELAY_URL=wss://" + addr["https"], "TETHER_RELAY_CA=" + filepath.Join(data, "ca.pem"),
		"TETHER_DEVICE_NAME=pi01", "TETHER_STATE_DIR=" + state, "TETHER_HEARTBEAT_INTERVAL=1s",
		"TETHER_SERVICES=web=" + web.URL + ",ssh=tcp://" + ssh,
	}
	agent := start(t, bin, "tether-agent", append(agentEnv, "TETHER_ENROLL_TOKEN="+token)...)
	leases, gen := waitLeases(t, bin, ctlEnv, 2, 0)

	client := publicClient(t, filepath.Join(data, "ca.pem"), addr)
	checkServed := func() {
		t.Helper()
		// The control plane reports a session's leases a moment before the
		// relay has made it routable: wait for the relay, not the listing.
		relaytest.Eventually(t, 10*time.Second, func() error {
			for _, u := range []string{"http://web-pi01.localhost/", "https://web-pi01.localhost/"} {
				code, body := tryGet(client, u)
				if code != 200 || !strings.Contains(body, "web on pi01 via "+strings.Split(u, ":")[0]) {
					return fmt.Errorf("%s: %d %q", u, code, body)
				}
			}
			return nil
		})
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", leases["ssh"].Port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintln(c, "hello")
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "HELLO\n" {
			t.Fatalf("tcp lease: %q %v", line, err)
		}
	}
	checkServed()
	if leases["web"].Hostname != "web-pi01.localhost" || leases["ssh"].Port != ports.First {
		t.Fatalf("leases %+v", leases)
	}

	var devices []controlplane.Device
	json.Unmarshal([]byte(ctl(t, bin, ctlEnv, "devices", "--json")), &devices)
	if len(devices) != 1 || devices[0].Name != "pi01" || !devices[0].Online || devices[0].Relay != "relay-1" || devices[0].Labels["site"] != "lab" {
		t.Fatalf("devices: %+v", devices)
	}
	if table := ctl(t, bin, ctlEnv, "leases"); !strings.Contains(table, "web-pi01.localhost") || !strings.Contains(table, fmt.Sprint(ports.First)) {
		t.Fatalf("leases table:\n%s", table)
	}

	t.Run("agent restart without token keeps identity and names", func(t *testing.T) {
		agent.stop(t, syscall.SIGTERM)
		if code := agent.exitCode(); code != 0 {
			t.Fatalf("agent exit status after SIGTERM: %d", code)
		}
		agent = start(t, bin, "tether-agent", agentEnv...)
		again, g := waitLeases(t, bin, ctlEnv, 2, gen)
		gen = g
		if fmt.Sprint(again) != fmt.Sprint(leases) {
			t.Fatalf("leases changed: %v then %v", leases, again)
		}
		checkServed()
	})

	t.Run("second relay on the same data dir fails fast", func(t *testing.T) {
		env := append([]string{}, relayEnv...)
		for i, kv := range env {
			if strings.HasPrefix(kv, "TETHER_") && strings.Contains(kv, "_ADDR=") {
				env[i] = strings.SplitN(kv, "=", 2)[0] + "=" + freeAddr(t)
			}
		}
		begin := time.Now()
		second := start(t, bin, "tether-relay", env...)
		second.waitExit(t, 5*time.Second)
		if d := time.Since(begin); d > 3*time.Second { // 2 s budget plus process start under -race load
			t.Errorf("second relay took %v to fail", d)
		}
		if second.exitCode() == 0 || !strings.Contains(second.stderr(), "locked by another process") {
			t.Fatalf("second relay: status %d, stderr %s", second.exitCode(), second.stderr())
		}
	})

	t.Run("relay restart and kill -9: leases kept, agent reconnects", func(t *testing.T) {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			relay.stop(t, sig)
			relay = start(t, bin, "tether-relay", relayEnv...)
			waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200)
			again, g := waitLeases(t, bin, ctlEnv, 2, gen)
			gen = g
			if fmt.Sprint(again) != fmt.Sprint(leases) {
				t.Fatalf("after %v: leases %v, want %v", sig, again, leases)
			}
			checkServed()
		}
	})

	t.Run("bad settings fail at start with a clear message", func(t *testing.T) {
		bad := start(t, bin, "tether-agent", append(agentEnv, "TETHER_SERVICES=web=http://127.0.0.1:3000,ssh=ftp://x:21")...)
		bad.waitExit(t, 10*time.Second)
		if bad.exitCode() != 1 || !strings.Contains(bad.stderr(), `"ssh=ftp://x:21"`) {
			t.Fatalf("status %d: %s", bad.exitCode(), bad.stderr())
		}
		typo := start(t, bin, "tether-agent", append(agentEnv, "TETHER_SERIVCES=x")...)
		typo.waitExit(t, 10*time.Second)
		if typo.exitCode() != 1 || !strings.Contains(typo.stderr(), "TETHER_SERIVCES") {
			t.Fatalf("typo: status %d: %s", typo.exitCode(), typo.stderr())
		}
		refused := start(t, bin, "tether-agent", "TETHER_RELAY_URL=wss://"+addr["https"], "TETHER_RELAY_CA="+filepath.Join(data, "ca.pem"),
			"TETHER_STATE_DIR="+t.TempDir(), "TETHER_SERVICES=web="+web.URL, "TETHER_ENROLL_TOKEN=tth_wrong")
		refused.waitExit(t, 10*time.Second)
		if refused.exitCode() != 4 || !strings.Contains(refused.stderr(), "401") || strings.Contains(relay.stderr(), "tth_wrong") {
			t.Fatalf("bad token: status %d: %s", refused.exitCode(), refused.stderr())
		}
	})

	t.Run("revoke cuts the agent off for good", func(t *testing.T) {
		begin := time.Now()
		if out := ctl(t, bin, ctlEnv, "revoke", "pi01"); !strings.Contains(out, "revoked pi01") {
			t.Fatalf("revoke printed %q", out)
		}
		agent.waitExit(t, 5*time.Second)
		t.Logf("agent exited %v after revoke", time.Since(begin))
		if agent.exitCode() != 3 || !strings.Contains(agent.stderr(), "revoked") {
			t.Fatalf("revoked agent: status %d: %s", agent.exitCode(), agent.stderr())
		}
		get(t, client, "http://web-pi01.localhost/", 503)
	})

	t.Run("ops endpoints", func(t *testing.T) {
		waitHTTP(t, "http://"+addr["ops"]+"/healthz", 200)
		resp, err := http.Get("http://" + addr["ops"] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, m := range []string{"tether_relay_agent_sessions", "tether_relay_handshakes_total", "tether_relay_http_requests_total", "go_goroutines"} {
			if !strings.Contains(string(body), m) {
				t.Errorf("/metrics lacks %s", m)
			}
		}
	})

	t.Run("no secret in any log line", func(t *testing.T) {
		adminToken, _ := os.ReadFile(filepath.Join(data, "admin-token"))
		var logs string
		for _, p := range procs {
			logs += p.stderr()
		}
		if !strings.Contains(logs, "device enrolled") {
			t.Fatal("the logs checked do not cover the enrollment")
		}
		for _, secret := range []string{token, strings.TrimSpace(string(adminToken))} {
			if strings.Contains(logs, secret) {
				t.Errorf("a secret appears in the logs")
			}
		}
	})

	t.Run("help and version", func(t *testing.T) {
		for _, name := range []string{"tether-relay", "tether-agent", "tether-controlplane"} {
			out, err := exec.Command(filepath.Join(bin, name), "--help").Output()
			if err != nil || !strings.Contains(string(out), "TETHER_LOG_LEVEL") || !strings.Contains(string(out), "--log-level") {
				t.Errorf("%s --help: %v\n%s", name, err, out)
			}
			out, err = exec.Command(filepath.Join(bin, name), "--version").Output()
			if err != nil || !strings.HasPrefix(string(out), name+" ") {
				t.Errorf("%s --version: %v %s", name, err, out)
			}
		}
		out, _ := exec.Command(filepath.Join(bin, "tetherctl"), "--help").Output()
		if !strings.Contains(string(out), "token create") || !strings.Contains(string(out), "TETHER_ADMIN_URL") {
			t.Errorf("tetherctl --help:\n%s", out)
		}
	})
}

func buildBinaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "./relay/cmd/tether-relay", "./agent/cmd/tether-agent",
		"./controlplane/cmd/tether-controlplane", "./controlplane/cmd/tetherctl")
	cmd.Dir = "../../.."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return dir
}

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is a binary this test started.
type proc struct {
	cmd       *exec.Cmd
	out, errb *syncBuffer
	done      chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// startProc starts a binary; it is stopped when owner ends.
func startProc(t, owner *testing.T, bin, name string, env ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(filepath.Join(bin, name)), out: &syncBuffer{}, errb: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.errb
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	owner.Cleanup(func() {
		p.stop(owner, syscall.SIGTERM)
		if owner.Failed() {
			owner.Logf("%s stderr:\n%s", name, p.stderr())
		}
	})
	return p
}

func (p *proc) stdout() string { return p.out.String() }
func (p *proc) stderr() string { return p.errb.String() }

func (p *proc) exitCode() int {
	<-p.done
	return p.cmd.ProcessState.ExitCode()
}

func (p *proc) waitExit(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("%s still running after %v", p.cmd.Path, within)
	}
}

func (p *proc) stop(t *testing.T, sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Errorf("%s ignored %v for 20s", p.cmd.Path, sig)
		p.cmd.Process.Kill()
		<-p.done
	}
}

func ctl(t *testing.T, bin string, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "tetherctl"), args...)
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tetherctl %v: %v\n%s", args, err, stderr.String())
	}
	return string(out)
}

// waitLeases waits until tetherctl shows n online leases of a session newer
// than generation after, and returns them by service (generation cleared)
// with the session's generation.
func waitLeases(t *testing.T, bin string, env []string, n int, after uint64) (map[string]controlplane.Lease, uint64) {
	t.Helper()
	var out map[string]controlplane.Lease
	var gen uint64
	relaytest.Eventually(t, 20*time.Second, func() error {
		cmd := exec.Command(filepath.Join(bin, "tetherctl"), "leases", "--json")
		cmd.Env = append(os.Environ(), env...)
		raw, err := cmd.Output()
		if err != nil {
			return err
		}
		var ls []controlplane.Lease
		if err := json.Unmarshal(raw, &ls); err != nil {
			return err
		}
		out = map[string]controlplane.Lease{}
		for _, l := range ls {
			if l.Online && l.Generation > after {
				gen = l.Generation
				l.Generation, l.CreatedAt = 0, time.Time{}
				out[l.Service] = l
			}
		}
		if len(out) != n {
			return fmt.Errorf("%d of %d leases online in a session after %d: %s", len(out), n, after, raw)
		}
		return nil
	})
	return out, gen
}

func waitHTTP(t *testing.T, url string, status int) {
	t.Helper()
	relaytest.Eventually(t, 20*time.Second, func() error {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != status {
			return errors.New(resp.Status)
		}
		return nil
	})
}

// publicClient reaches the relay's listeners whatever the URL's host, as a
// browser does for *.localhost, and trusts the relay's dev CA.
func publicClient(t *testing.T, caFile string, addr map[string]string) *http.Client {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
			target := addr["http"]
			if strings.HasSuffix(a, ":443") {
				target = addr["https"]
			}
			return (&net.Dialer{}).DialContext(ctx, network, target)
		},
		DisableKeepAlives: true,
	}}
}

func tryGet(c *http.Client, url string) (int, string) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func get(t *testing.T, c *http.Client, url string, status int) string {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("GET %s: %d, want %d: %s", url, resp.StatusCode, status, b)
	}
	return string(b)
}
