package agent

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/splice"
	"github.com/tetherfleet/tether/relay/devca"
)

// Environment of TestProxyChild, set by TestProxyFromEnvironment.
const (
	childRelayURL  = "AGENT_PROXY_TEST_RELAY_URL"
	childRelayAddr = "AGENT_PROXY_TEST_RELAY_ADDR"
	childCA        = "AGENT_PROXY_TEST_CA"
)

// TestProxyFromEnvironment runs an agent wired as tether-agent wires it
// (Proxy: http.ProxyFromEnvironment) in a fresh process per case, since
// net/http reads the proxy variables once per process. A CONNECT proxy on
// loopback records what went through it. The relay's names (relay.test,
// 192.0.2.10, a documentation address) exist only in the agent's dialer,
// which sends them to the fake relay on loopback.
func TestProxyFromEnvironment(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a process per case")
	}
	ca, err := devca.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCert([]string{"relay.test", "192.0.2.10", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	f := newFakeRelay(t, &cert)
	go func() { // the fake relay's sessions are not driven here
		for s := range f.sessions {
			s.mux.Close()
		}
	}()
	t.Cleanup(func() { close(f.sessions) })
	relayAddr := f.srv.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(relayAddr)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	proxy := startConnectProxy(t, relayAddr)

	for _, tc := range []struct {
		name, relayHost, noProxy string
		proxied                  bool
	}{
		{"HTTPS_PROXY is used", "relay.test", "", true},
		{"loopback is never proxied", "127.0.0.1", "", false},
		{"NO_PROXY domain", "relay.test", "relay.test", false},
		{"NO_PROXY domain matches subdomains", "relay.test", "test", false},
		{"NO_PROXY *.domain", "relay.test", "example.com,*.test", false},
		{"NO_PROXY host:port", "relay.test", "relay.test:" + port, false},
		{"NO_PROXY host:other-port", "relay.test", "relay.test:1", true},
		{"NO_PROXY CIDR", "192.0.2.10", "192.0.2.0/24", false},
		{"NO_PROXY other CIDR", "192.0.2.10", "198.51.100.0/24", true},
		{"NO_PROXY other host", "relay.test", "other.test", true},
		{"NO_PROXY *", "relay.test", "*", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := proxy.count()
			cmd := exec.Command(os.Args[0], "-test.run=^TestProxyChild$", "-test.count=1")
			cmd.Env = append(withoutProxyVars(os.Environ()),
				"HTTPS_PROXY=http://"+proxy.addr, "NO_PROXY="+tc.noProxy,
				childRelayURL+"=wss://"+net.JoinHostPort(tc.relayHost, port), childRelayAddr+"="+relayAddr, childCA+"="+caFile)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "PASS") {
				t.Fatalf("agent process: %v\n%s", err, out)
			}
			tunnels := proxy.count() - before
			if tc.proxied && tunnels != 2 { // the enrollment POST and the WebSocket
				t.Fatalf("%d CONNECTs through the proxy, want 2 (enrollment and session)\n%s", tunnels, out)
			}
			if !tc.proxied && tunnels != 0 {
				t.Fatalf("%d CONNECTs through the proxy, want none\n%s", tunnels, out)
			}
		})
	}
}

// TestProxyChild is one agent process of TestProxyFromEnvironment: it
// enrolls and connects once, then stops.
func TestProxyChild(t *testing.T) {
	url, relayAddr := os.Getenv(childRelayURL), os.Getenv(childRelayAddr)
	if url == "" {
		t.Skip("run by TestProxyFromEnvironment")
	}
	pem, err := os.ReadFile(os.Getenv(childCA))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatal("no CA certificate")
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	fake := map[string]bool{"relay.test": true, "192.0.2.10": true}
	dialer := &net.Dialer{}
	a, err := New(Config{
		RelayURLs: []string{url}, EnrollToken: "tth_x", StateDir: t.TempDir(), DeviceName: "dev",
		Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, RootCAs: roots,
		Proxy: http.ProxyFromEnvironment, // as tether-agent's main wires it
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if host, _, _ := net.SplitHostPort(addr); fake[host] {
				addr = relayAddr // what DNS would answer
			}
			return dialer.DialContext(ctx, network, addr)
		},
		OnLeases: func([]frames.Lease) { cancel() },
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if ctx.Err() == nil {
		t.Fatal("agent stopped before it connected")
	}
}

func withoutProxyVars(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "REQUEST_METHOD":
		default:
			out = append(out, kv)
		}
	}
	return out
}

// connectProxy is an HTTP CONNECT proxy that sends every tunnel to one
// address and counts the tunnels.
type connectProxy struct {
	addr string
	mu   sync.Mutex
	n    int
}

func (p *connectProxy) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

func startConnectProxy(t *testing.T, target string) *connectProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(c, target) })
		}
	})
	return p
}

func (p *connectProxy) serve(c net.Conn, target string) {
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil || req.Method != http.MethodConnect {
		fmt.Fprint(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
		return
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		fmt.Fprint(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	p.mu.Lock()
	p.n++
	p.mu.Unlock()
	fmt.Fprint(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	splice.Splice(&bufferedConn{Conn: c, r: br}, up)
}

// bufferedConn reads through the proxy's bufio.Reader first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }
