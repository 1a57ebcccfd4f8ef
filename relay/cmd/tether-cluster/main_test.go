package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross/harness"
)

// TestMakeCluster runs the launcher as make cluster does, on free ports
// and a temporary state dir: it waits for the summary, reaches the demo
// with each printed curl line (done here, as curl would), stops the
// launcher with SIGINT and checks that every process it started is gone;
// then a second run on the same state brings back the same names.
func TestMakeCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries and runs a whole cluster")
	}
	dir := t.TempDir()
	launcher := filepath.Join(dir, "tether-cluster")
	build := exec.CommandContext(t.Context(), "go", "build", "-o", launcher, ".")
	build.Env = append(os.Environ(), "GOTOOLCHAIN=local", "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the launcher: %v\n%s", err, out)
	}
	conf, err := filepath.Abs("../../deploy/nats.conf")
	if err != nil {
		t.Fatal(err)
	}
	p := pickPorts(t)
	args := []string{"-bin", filepath.Join(dir, "bin"), "-state", filepath.Join(dir, "state"), "-nats-conf", conf,
		"-http-port", p.get(), "-https-port", p.get(), "-cluster-port", p.get(), "-ops-port", p.get(),
		"-tcp-ports", p.tcp, "-nats-port", p.get(), "-nats-monitor-port", p.get(), "-admin-port", p.get(), "-cp-ops-port", p.get()}

	first, ok := startCluster(t, launcher, args)
	if !ok {
		return // skipped: the binaries cannot run a cluster yet
	}
	var pending []string // what does not work yet
	for _, r := range first.relays {
		for _, l := range r.lines {
			err := curl(t.Context(), l.cmd)
			switch {
			case err == nil:
			case r.holds:
				t.Errorf("%s holds the session, yet %s: %v", r.id, l.cmd, err)
			default:
				pending = append(pending, fmt.Sprintf("%s %s: %v", r.id, l.kind, err))
			}
			if (err == nil) != l.ok {
				t.Errorf("the launcher said %v for %q, this test got %v", l.ok, l.cmd, err)
			}
		}
	}
	stopCluster(t, first)

	second, _ := startCluster(t, launcher, append(args, "-no-build"))
	if first.host == "" || second.host != first.host || second.port != first.port {
		t.Errorf("second run: the demo at %s and TCP port %s, first run %s and %s: want the same", second.host, second.port, first.host, first.port)
	}
	stopCluster(t, second)

	if len(pending) > 0 {
		t.Skipf("the demo is served through the relay that holds the agent's session (HTTP, HTTPS with the cluster CA, TCP lease), "+
			"the launcher stops every process on SIGINT, a second run keeps the names; NOT YET through the other relays "+
			"(cross-relay forwarding and TCP leases on every relay are not in):\n  %s", strings.Join(pending, "\n  "))
	}
}

// summary is what the launcher printed once the cluster runs.
type summary struct {
	proc   *harness.Proc
	relays []relayLines
	pids   map[string]int
	host   string // the demo's hostname
	port   string // the demo's TCP lease port
}

type relayLines struct {
	id    string
	holds bool
	lines []curlLine
}

type curlLine struct {
	ok   bool
	kind string // http, https, tcp
	cmd  string
}

var (
	relayRE  = regexp.MustCompile(`^\s+(relay-\d+) on (\S+)(\s+\(holds the agent's session\))?$`)
	lineRE   = regexp.MustCompile(`^\s+(ok|FAIL)\s+(https?|tcp)\s+(curl .*)$`)
	pidRE    = regexp.MustCompile(`^\s+(\S+)\s+pid (\d+)\s`)
	hostRE   = regexp.MustCompile(`Host: ([^']+)'`)
	tcpURLRE = regexp.MustCompile(`^curl http://[0-9.]+:(\d+)/$`)
)

// startCluster starts the launcher and waits for its summary. When the
// launcher refuses because the binaries lack a setting the cluster needs,
// it checks that nothing was left running and skips the test.
func startCluster(t *testing.T, launcher string, args []string) (*summary, bool) {
	t.Helper()
	p := harness.StartT(t, harness.Cmd{Path: launcher, Args: args})
	err := harness.Poll(t.Context(), 5*time.Minute, func() error {
		if !strings.Contains(p.Stdout(), "Ctrl-C stops everything.") {
			return errors.New("no summary yet")
		}
		return nil
	}, p)
	if err != nil {
		if p.Exited() && strings.Contains(p.Stderr(), "cannot run this cluster") {
			if p.ExitCode() != 1 {
				t.Errorf("refused with status %d, want 1", p.ExitCode())
			}
			t.Skipf("the binaries cannot run a cluster yet; the launcher says so, started nothing:\n%s", p.Stderr())
		}
		t.Fatalf("the launcher did not print its summary: %v\n%s", err, p.Logs())
	}
	s := &summary{proc: p, pids: map[string]int{}}
	for line := range strings.Lines(p.Stdout()) {
		line = strings.TrimRight(line, "\n")
		if m := relayRE.FindStringSubmatch(line); m != nil {
			s.relays = append(s.relays, relayLines{id: m[1], holds: m[3] != ""})
		} else if m := lineRE.FindStringSubmatch(line); m != nil && len(s.relays) > 0 {
			r := &s.relays[len(s.relays)-1]
			r.lines = append(r.lines, curlLine{ok: m[1] == "ok", kind: m[2], cmd: m[3]})
			if h := hostRE.FindStringSubmatch(m[3]); h != nil {
				s.host = h[1]
			}
			if u := tcpURLRE.FindStringSubmatch(m[3]); u != nil && m[2] == "tcp" {
				s.port = u[1]
			}
		} else if m := pidRE.FindStringSubmatch(line); m != nil {
			s.pids[m[1]], _ = strconv.Atoi(m[2])
		}
	}
	holders := 0
	for _, r := range s.relays {
		if len(r.lines) != 3 {
			t.Errorf("%s: %d curl lines, want http, https and tcp", r.id, len(r.lines))
		}
		if r.holds {
			holders++
		}
	}
	if len(s.relays) != 3 || holders != 1 || len(s.pids) != 6 {
		t.Fatalf("summary: %d relays (%d holding the session), %d processes; want 3, 1 and 6:\n%s", len(s.relays), holders, len(s.pids), p.Stdout())
	}
	return s, true
}

// stopCluster sends SIGINT, as Ctrl-C does, and checks that the launcher
// exits 0 and that every process it named is gone.
func stopCluster(t *testing.T, s *summary) {
	t.Helper()
	if err := s.proc.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := s.proc.WaitExit(90 * time.Second); err != nil {
		t.Fatalf("after SIGINT: %v", err)
	}
	if code := s.proc.ExitCode(); code != 0 || !strings.Contains(s.proc.Stdout(), "stopped.") {
		t.Errorf("after SIGINT: status %d\n%s", code, s.proc.Logs())
	}
	for name, pid := range s.pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s (pid %d) is still there after the launcher stopped (kill -0: %v)", name, pid, err)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// curl does what a printed curl command line does: -H 'Host: ...',
// --cacert FILE, --resolve HOST:PORT:ADDR and a URL; it wants a 200 with
// the demo page.
func curl(ctx context.Context, line string) error {
	args, err := shellWords(line)
	if err != nil || len(args) < 2 || args[0] != "curl" {
		return fmt.Errorf("not a curl line (%v): %q", err, line)
	}
	var host, cacert, url string
	resolve := map[string]string{}
	for i := 1; i < len(args); i++ {
		next := func() string {
			i++
			if i < len(args) {
				return args[i]
			}
			return ""
		}
		switch a := args[i]; a {
		case "-H":
			h := next()
			if v, ok := strings.CutPrefix(h, "Host: "); ok {
				host = v
			}
		case "--cacert":
			cacert = next()
		case "--resolve":
			parts := strings.SplitN(next(), ":", 3)
			if len(parts) != 3 {
				return fmt.Errorf("--resolve in %q", line)
			}
			resolve[parts[0]+":"+parts[1]] = net.JoinHostPort(parts[2], parts[1])
		default:
			if strings.HasPrefix(a, "-") {
				return fmt.Errorf("option %s of %q is not understood here", a, line)
			}
			url = a
		}
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		if to, ok := resolve[addr]; ok {
			addr = to
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if host != "" {
		req.Host = host
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), marker) {
		return fmt.Errorf("%s: %s", resp.Status, gist(string(body)))
	}
	return nil
}

// shellWords splits a command line as a POSIX shell would, for the
// quoting shellQuote and the summary use (single quotes, plain words).
func shellWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	in, quoted := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quoted && c == '\'':
			quoted = false
		case quoted:
			w.WriteByte(c)
		case c == '\'':
			quoted, in = true, true
		case c == '\\' && i+1 < len(s):
			i++
			w.WriteByte(s[i])
			in = true
		case c == ' ' || c == '\t':
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteByte(c)
			in = true
		}
	}
	if quoted {
		return nil, errors.New("unterminated quote")
	}
	if in {
		words = append(words, w.String())
	}
	return words, nil
}

func TestShellWords(t *testing.T) {
	for _, path := range []string{"/tmp/a b/ca.pem", "it's", "plain", `a\b`} {
		line := "curl --cacert " + shellQuote(path) + " -H 'Host: x.localhost' http://127.0.0.2:8080/"
		w, err := shellWords(line)
		if err != nil || len(w) != 6 || w[2] != path || w[4] != "Host: x.localhost" {
			t.Errorf("%q: %q %v", line, w, err)
		}
	}
}

// ports are free ports for one cluster: each free on 127.0.0.1, .2 and .3
// (the relays use the same ports on each), and a TCP lease range.
type ports struct {
	free []int
	tcp  string
}

func (p *ports) get() string {
	n := p.free[0]
	p.free = p.free[1:]
	return strconv.Itoa(n)
}

func pickPorts(t *testing.T) *ports {
	t.Helper()
	hosts := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}
	var held []net.Listener
	defer func() {
		for _, ln := range held {
			ln.Close()
		}
	}()
	// listenAll holds port on every host, or none (until the ports are
	// handed over).
	listenAll := func(port int) (int, bool) {
		var lns []net.Listener
		for _, h := range hosts {
			ln, err := net.Listen("tcp", net.JoinHostPort(h, strconv.Itoa(port)))
			if err != nil {
				for _, l := range lns {
					l.Close()
				}
				return 0, false
			}
			if port == 0 {
				port = ln.Addr().(*net.TCPAddr).Port
			}
			lns = append(lns, ln)
		}
		held = append(held, lns...)
		return port, true
	}
	p := &ports{}
	for len(p.free) < 8 {
		if port, ok := listenAll(0); ok {
			p.free = append(p.free, port)
		}
	}
	const n = 10
	for range 200 {
		first := 20000 + rand.IntN(12000) // below the ephemeral range
		mark := len(held)
		all := true
		for port := first; port < first+n && all; port++ {
			_, all = listenAll(port)
		}
		if !all {
			for _, ln := range held[mark:] {
				ln.Close()
			}
			held = held[:mark]
		}
		if all {
			p.tcp = fmt.Sprintf("%d-%d", first, first+n-1)
			return p
		}
	}
	t.Fatal("no free TCP lease range on 127.0.0.1-3")
	return nil
}

func TestPickPorts(t *testing.T) {
	p := pickPorts(t)
	seen := map[int]bool{}
	for _, n := range p.free {
		if seen[n] {
			t.Fatalf("port %d twice in %v", n, p.free)
		}
		seen[n] = true
	}
	a, b, ok := strings.Cut(p.tcp, "-")
	first, err1 := strconv.Atoi(a)
	last, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || last-first != 9 || seen[first] {
		t.Fatalf("tcp range %q", p.tcp)
	}
}
