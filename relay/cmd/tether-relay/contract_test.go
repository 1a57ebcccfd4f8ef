package main_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestContract builds the four binaries and uses them as an operator would:
// only environment variables, tetherctl, HTTP and TCP.
func TestContract(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin := harness.BuildT(t, "tether-relay", "tether-agent", "tether-controlplane", "tetherctl")
	top := t                  // processes live until the whole test ends
	var procs []*harness.Proc // every process started, for the log checks
	start := func(t *testing.T, bin, name string, env ...string) *harness.Proc {
		t.Helper()
		p, err := harness.Start(harness.Cmd{Path: filepath.Join(bin, name), Env: env})
		if err != nil {
			t.Fatal(err)
		}
		harness.StopAtEnd(top, p)
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
		// Kubernetes sets variables like this one for a service named
		// tether-relay: warned about, never refused.
		"TETHER_RELAY_SERVICE_HOST=x",
	}
	ctlEnv := []string{"TETHER_ADMIN_URL=http://" + addr["admin"], "TETHER_ADMIN_TOKEN_FILE=" + filepath.Join(data, "admin-token")}

	relay := start(t, bin, "tether-relay", relayEnv...)
	waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200, relay)
	if !strings.Contains(relay.Stdout(), "Admin token (shown once") {
		t.Fatalf("relay did not print the generated admin token: %s", relay.Stdout())
	}
	if line := warning(relay, "TETHER_RELAY_SERVICE_HOST"); line == "" {
		t.Errorf("the relay started without a warning naming TETHER_RELAY_SERVICE_HOST:\n%s", relay.Logs())
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
		stop(t, agent, syscall.SIGTERM)
		if code := agent.ExitCode(); code != 0 {
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
		begin := time.Now()
		second := start(t, bin, "tether-relay", otherAddrs(t, relayEnv)...)
		waitExit(t, second, 5*time.Second)
		if d := time.Since(begin); d > 3*time.Second { // 2 s budget plus process start under -race load
			t.Errorf("second relay took %v to fail", d)
		}
		if second.ExitCode() == 0 || !strings.Contains(second.Stderr(), "locked by another process") {
			t.Fatalf("second relay: status %d, stderr %s", second.ExitCode(), second.Stderr())
		}
	})

	t.Run("relay restart and kill -9: leases kept, agent reconnects", func(t *testing.T) {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			stop(t, relay, sig)
			relay = start(t, bin, "tether-relay", relayEnv...)
			waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200, relay)
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
		waitExit(t, bad, 10*time.Second)
		if bad.ExitCode() != 1 || !strings.Contains(bad.Stderr(), `"ssh=ftp://x:21"`) {
			t.Fatalf("status %d: %s", bad.ExitCode(), bad.Stderr())
		}
		badRelay := start(t, bin, "tether-relay", append(otherAddrs(t, relayEnv), "TETHER_DATA_DIR="+t.TempDir(), "TETHER_TCP_PORTS=not-a-range")...)
		waitExit(t, badRelay, 10*time.Second)
		if badRelay.ExitCode() != 1 || !strings.Contains(badRelay.Stderr(), "not-a-range") {
			t.Fatalf("relay with TETHER_TCP_PORTS=not-a-range: status %d: %s", badRelay.ExitCode(), badRelay.Stderr())
		}
		badTimeout := start(t, bin, "tether-relay", append(otherAddrs(t, relayEnv), "TETHER_DATA_DIR="+t.TempDir(), "TETHER_HANDSHAKE_TIMEOUT=10m")...)
		waitExit(t, badTimeout, 10*time.Second)
		if badTimeout.ExitCode() != 1 || !strings.Contains(badTimeout.Stderr(), "TETHER_HANDSHAKE_TIMEOUT=10m0s: want 1s..2m") {
			t.Fatalf("relay with TETHER_HANDSHAKE_TIMEOUT=10m: status %d: %s", badTimeout.ExitCode(), badTimeout.Stderr())
		}
		badID := start(t, bin, "tether-relay", append(otherAddrs(t, relayEnv), "TETHER_DATA_DIR="+t.TempDir(), "TETHER_RELAY_ID=Relay_1")...)
		waitExit(t, badID, 10*time.Second)
		if badID.ExitCode() != 1 || !strings.Contains(badID.Stderr(), "TETHER_RELAY_ID") || !strings.Contains(badID.Stderr(), "Relay_1") {
			t.Fatalf("relay with TETHER_RELAY_ID=Relay_1: status %d: %s", badID.ExitCode(), badID.Stderr())
		}
		// An unknown variable is warned about, naming the closest known
		// one, and the agent goes on: this one, never enrolled and given
		// no token, then stops with status 4, not 1.
		typo := start(t, bin, "tether-agent", "TETHER_RELAY_URL=wss://"+addr["https"], "TETHER_RELAY_CA="+filepath.Join(data, "ca.pem"),
			"TETHER_STATE_DIR="+t.TempDir(), "TETHER_SERVICES=web="+web.URL, "TETHER_SERIVCES=x")
		waitExit(t, typo, 10*time.Second)
		if line := warning(typo, "TETHER_SERIVCES"); typo.ExitCode() != 4 || !strings.Contains(line, "TETHER_SERVICES") {
			t.Fatalf("typo: status %d, warning %q:\n%s", typo.ExitCode(), line, typo.Logs())
		}
		refused := start(t, bin, "tether-agent", "TETHER_RELAY_URL=wss://"+addr["https"], "TETHER_RELAY_CA="+filepath.Join(data, "ca.pem"),
			"TETHER_STATE_DIR="+t.TempDir(), "TETHER_SERVICES=web="+web.URL, "TETHER_ENROLL_TOKEN=tth_wrong")
		waitExit(t, refused, 10*time.Second)
		if refused.ExitCode() != 4 || !strings.Contains(refused.Stderr(), "401") || strings.Contains(relay.Stderr(), "tth_wrong") {
			t.Fatalf("bad token: status %d: %s", refused.ExitCode(), refused.Stderr())
		}
	})

	t.Run("revoke cuts the agent off for good", func(t *testing.T) {
		begin := time.Now()
		if out := ctl(t, bin, ctlEnv, "revoke", "pi01"); !strings.Contains(out, "revoked pi01") {
			t.Fatalf("revoke printed %q", out)
		}
		waitExit(t, agent, 5*time.Second)
		t.Logf("agent exited %v after revoke", time.Since(begin))
		if agent.ExitCode() != 3 || !strings.Contains(agent.Stderr(), "revoked") {
			t.Fatalf("revoked agent: status %d: %s", agent.ExitCode(), agent.Stderr())
		}
		get(t, client, "http://web-pi01.localhost/", 503)
	})

	t.Run("ops endpoints", func(t *testing.T) {
		waitHTTP(t, "http://"+addr["ops"]+"/healthz", 200, relay)
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
		// Profiles only with TETHER_PPROF=1 (not set here).
		get(t, http.DefaultClient, "http://"+addr["ops"]+"/debug/pprof/", 404)
		get(t, http.DefaultClient, "http://"+addr["ops"]+"/debug/pprof/heap", 404)
	})

	t.Run("no secret in any log line", func(t *testing.T) {
		adminToken, _ := os.ReadFile(filepath.Join(data, "admin-token"))
		var logs string
		for _, p := range procs {
			logs += p.Stderr()
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

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// otherAddrs is env with a free address in every TETHER_*_ADDR.
func otherAddrs(t *testing.T, env []string) []string {
	env = slices.Clone(env)
	for i, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "TETHER_") && strings.HasSuffix(k, "_ADDR") {
			env[i] = k + "=" + freeAddr(t)
		}
	}
	return env
}

// stop stops p with sig (SIGKILL to crash it), failing t if p ignores it.
func stop(t *testing.T, p *harness.Proc, sig syscall.Signal) {
	t.Helper()
	if err := p.StopWith(sig, harness.StopGrace); err != nil {
		t.Error(err)
	}
}

func waitExit(t *testing.T, p *harness.Proc, within time.Duration) {
	t.Helper()
	if err := p.WaitExit(within); err != nil {
		t.Fatalf("%v\n%s", err, p.Logs())
	}
}

// warning returns the first line of p's output that is a warning naming
// the variable name, or "".
func warning(p *harness.Proc, name string) string {
	for line := range strings.Lines(p.Stdout() + p.Stderr()) {
		if strings.Contains(line, name) && strings.Contains(strings.ToUpper(line), "WARN") {
			return line
		}
	}
	return ""
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

// waitHTTP waits until url answers status, failing fast if the process
// that serves it exits.
func waitHTTP(t *testing.T, url string, status int, server *harness.Proc) {
	t.Helper()
	if err := harness.WaitHTTP(t.Context(), url, status, 20*time.Second, server); err != nil {
		t.Fatalf("%v\n%s", err, server.Logs())
	}
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

// TestClusterContract runs the cluster as an operator would on two hosts:
// a NATS server with Tether's users, tether-controlplane, two relays in
// cluster mode (NATS user and password file, relay IDs, public names,
// cluster addresses on 127.0.0.1 and 127.0.0.2) and an agent that lists
// both relays and trusts the control plane's ca.pem. The device, held by
// the first relay, is served through the second too, over HTTPS and TCP.
func TestClusterContract(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin := harness.BuildT(t, "tether-relay", "tether-agent", "tether-controlplane", "tetherctl")
	top := t
	start := func(name string, env ...string) *harness.Proc {
		t.Helper()
		p, err := harness.Start(harness.Cmd{Path: filepath.Join(bin, name), Env: env})
		if err != nil {
			t.Fatal(err)
		}
		harness.StopAtEnd(top, p)
		return p
	}
	ns, err := natsembed.StartConfig(natsembed.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	dir := t.TempDir()
	passFile := filepath.Join(dir, "relay-password")
	if err := os.WriteFile(passFile, []byte(ns.Auth(natsperm.Relay).Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ports := relaytest.FreePortRange(t, 8)
	cpData, admin := filepath.Join(dir, "controlplane"), freeAddr(t)
	cp := start("tether-controlplane", "TETHER_NATS_URL="+ns.ClientURL(), "TETHER_NATS_USER=controlplane",
		"TETHER_NATS_PASSWORD="+ns.Auth(natsperm.ControlPlane).Password, "TETHER_DATA_DIR="+cpData, "TETHER_CLAIM_WAIT=100ms",
		"TETHER_TCP_PORTS="+ports.String(), "TETHER_ADMIN_ADDR="+admin, "TETHER_OPS_ADDR="+freeAddr(t), "TETHER_LOG_FORMAT=json")
	waitHTTP(t, "http://"+admin+"/v1/relays", 401, cp)

	type relayAddrs map[string]string
	var relays []relayAddrs
	for i, host := range []string{"127.0.0.1", "127.0.0.2"} {
		a := relayAddrs{"https": freeAddrOn(t, host), "http": freeAddrOn(t, host), "ops": freeAddrOn(t, host), "cluster": freeAddrOn(t, host), "host": host}
		id := fmt.Sprintf("relay-%d", i+1)
		p := start("tether-relay", "TETHER_NATS_URL="+ns.ClientURL(), "TETHER_NATS_USER=relay", "TETHER_NATS_PASSWORD_FILE="+passFile,
			"TETHER_RELAY_ID="+id, "TETHER_PUBLIC_NAMES="+id+".localhost", "TETHER_DATA_DIR="+filepath.Join(dir, id),
			"TETHER_HTTPS_ADDR="+a["https"], "TETHER_HTTP_ADDR="+a["http"], "TETHER_OPS_ADDR="+a["ops"], "TETHER_CLUSTER_ADDR="+a["cluster"],
			"TETHER_TCP_HOST="+host, "TETHER_TCP_PORTS="+ports.String(), "TETHER_DRAIN_WINDOW=500ms", "TETHER_LOG_FORMAT=json")
		relaytest.Eventually(t, 20*time.Second, func() error {
			code, body := tryGet(http.DefaultClient, "http://"+a["ops"]+"/readyz")
			if code != 200 || body != "ready\n" {
				return fmt.Errorf("%s /readyz: %d %q\n%s", id, code, body, p.Logs())
			}
			return nil
		})
		relays = append(relays, a)
		root, _ := os.ReadFile(filepath.Join(dir, id, "ca.pem"))
		if cpRoot, _ := os.ReadFile(filepath.Join(cpData, "ca.pem")); len(root) == 0 || string(root) != string(cpRoot) {
			t.Fatalf("%s's ca.pem is not the control plane's root", id)
		}
	}

	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "web on pi01 for %s", r.Header.Get("X-Forwarded-For"))
	}))
	defer web.Close()
	ssh := relaytest.LineService(t)
	ctlEnv := []string{"TETHER_ADMIN_URL=http://" + admin, "TETHER_ADMIN_TOKEN_FILE=" + filepath.Join(cpData, "admin-token")}
	token := strings.TrimSpace(ctl(t, bin, ctlEnv, "token", "create"))
	start("tether-agent", "TETHER_RELAY_URL=wss://"+relays[0]["https"]+",wss://"+relays[1]["https"], "TETHER_RELAY_CA="+filepath.Join(cpData, "ca.pem"),
		"TETHER_DEVICE_NAME=pi01", "TETHER_STATE_DIR="+t.TempDir(), "TETHER_HEARTBEAT_INTERVAL=1s", "TETHER_ENROLL_TOKEN="+token,
		"TETHER_SERVICES=web="+web.URL+",ssh=tcp://"+ssh)
	leases, _ := waitLeases(t, bin, ctlEnv, 2, 0)
	if leases["web"].Relay != "relay-1" {
		t.Fatalf("the agent's session is on %q, want relay-1 (its first URL)", leases["web"].Relay)
	}
	second := publicClient(t, filepath.Join(cpData, "ca.pem"), map[string]string{"http": relays[1]["http"], "https": relays[1]["https"]})
	relaytest.Eventually(t, 20*time.Second, func() error {
		if code, body := tryGet(second, "https://web-pi01.localhost/"); code != 200 || !strings.HasPrefix(body, "web on pi01 for 127.0.0.1") {
			return fmt.Errorf("through relay-2: %d %q", code, body)
		}
		return nil
	})
	c, err := net.Dial("tcp", net.JoinHostPort(relays[1]["host"], fmt.Sprint(leases["ssh"].Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintln(c, "hello")
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); err != nil || string(got) != "HELLO\nbye\n" {
		t.Fatalf("TCP lease through relay-2: %q %v", got, err)
	}
	if out := ctl(t, bin, ctlEnv, "relays"); !strings.Contains(out, "relay-1") || !strings.Contains(out, "relay-2") || !strings.Contains(out, "relay-1.localhost") {
		t.Fatalf("tetherctl relays:\n%s", out)
	}
}

func freeAddrOn(t *testing.T, host string) string {
	ln, err := net.Listen("tcp", host+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
