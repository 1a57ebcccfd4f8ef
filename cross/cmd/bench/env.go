package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
)

// env is the system under test: origin services, a relay process, and the
// agents under test (the baseline's and the current one), each its own
// process publishing the origins under its own device name.
type env struct {
	s                   settings
	dir, bin, data      string
	httpAddr, httpsAddr string
	opsAddr, adminAddr  string
	tcpPorts            string
	origin              *http.Server
	originAddr          string
	srcAddr, sinkAddr   string
	relay               *harness.Proc
	agents              []*agentRun // the baseline first, if any; current() last
	caPool              *x509.CertPool
	admin               *httpapi.Client
}

// agentRun is one agent binary under test and the names the relay gave it.
type agentRun struct {
	label             string // "baseline" or "current"
	rev               string // what it was built from
	path              string // its binary, for this machine
	arm64             int64  // its stripped linux/arm64 size in bytes
	device            string
	proc              *harness.Proc
	idleRSS           int64  // right after it registered, before any load
	host              string // the web service's public hostname
	srcPort, sinkPort int    // TCP leases
}

// current is the agent of the working tree.
func (e *env) current() *agentRun { return e.agents[len(e.agents)-1] }

// row fills x's baseline and current figures from perAgent, which is in
// the order of e.agents.
func (e *env) row(x row, perAgent [][]float64) row {
	x.current = perAgent[len(perAgent)-1]
	if len(perAgent) > 1 {
		x.baseline = perAgent[0]
	}
	return x
}

func newEnv(ctx context.Context, s settings) (*env, error) {
	dir, err := os.MkdirTemp("", "tether-bench-")
	if err != nil {
		return nil, err
	}
	e := &env{s: s, dir: dir, bin: filepath.Join(dir, "bin"), data: filepath.Join(dir, "data")}
	if err := e.build(ctx); err != nil {
		return e, err
	}
	if err := e.startOrigins(); err != nil {
		return e, err
	}
	e.httpAddr, e.httpsAddr, e.opsAddr, e.adminAddr = freeAddr(), freeAddr(), freeAddr(), freeAddr()
	first := 40000 + time.Now().Nanosecond()%10000
	e.tcpPorts = fmt.Sprintf("%d-%d", first, first+9)
	if err := e.startRelay(ctx); err != nil {
		return e, err
	}
	pem, err := os.ReadFile(filepath.Join(e.data, "ca.pem"))
	if err != nil {
		return e, err
	}
	e.caPool = x509.NewCertPool()
	e.caPool.AppendCertsFromPEM(pem)
	token, _ := os.ReadFile(filepath.Join(e.data, "admin-token"))
	e.admin = &httpapi.Client{BaseURL: "http://" + e.adminAddr, Token: strings.TrimSpace(string(token))}
	tok, err := e.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: 1 << 20, TTL: "2h"})
	if err != nil {
		return e, err
	}
	for _, a := range e.agents {
		a.proc, err = harness.Start(harness.Cmd{Path: a.path, Env: []string{
			"TETHER_RELAY_URL=wss://" + e.httpsAddr, "TETHER_RELAY_CA=" + filepath.Join(e.data, "ca.pem"),
			"TETHER_ENROLL_TOKEN=" + tok.Secret, "TETHER_DEVICE_NAME=" + a.device, "TETHER_STATE_DIR=" + filepath.Join(dir, a.device),
			"TETHER_SERVICES=web=http://" + e.originAddr + ",src=tcp://" + e.srcAddr + ",sink=tcp://" + e.sinkAddr,
			"TETHER_LOG_LEVEL=warn"}})
		if err != nil {
			return e, err
		}
	}
	for _, a := range e.agents {
		if err := e.waitLeases(ctx, a); err != nil {
			return e, fmt.Errorf("%w\n%s%s", err, a.proc.Logs(), e.relay.Logs())
		}
	}
	settle(ctx, time.Second)
	for _, a := range e.agents {
		a.idleRSS, _, _ = a.proc.RSS()
	}
	return e, nil
}

// build builds the relay, the current agent and the fleet simulator for
// this machine, the current agent for linux/arm64 (its size), and the
// baseline agent both ways.
func (e *env) build(ctx context.Context) error {
	log.Printf("building the relay, the agent and the fleet simulator")
	if err := harness.Build(ctx, e.bin, "tether-relay", "tether-agent", "tether-fleetsim"); err != nil {
		return err
	}
	cur := &agentRun{label: "current", rev: "working tree", path: filepath.Join(e.bin, "tether-agent"), device: "bench"}
	arm64, _ := cross.Find("tether-agent", "arm64")
	rs, err := cross.Build(ctx, cross.Options{OutDir: filepath.Join(e.dir, "current-arm64"), Targets: []cross.Target{arm64}})
	if err != nil && !errors.As(err, new(*cross.BudgetError)) {
		return err
	}
	cur.arm64 = rs[0].Size
	if e.s.baseline != "" {
		base, err := buildBaseline(ctx, e.s.baseline, filepath.Join(e.dir, "baseline"))
		if err != nil {
			return fmt.Errorf("baseline agent: %w", err)
		}
		e.agents = append(e.agents, base)
	}
	e.agents = append(e.agents, cur)
	return nil
}

// waitLeases waits until a's three services are online and records their names.
func (e *env) waitLeases(ctx context.Context, a *agentRun) error {
	return harness.Poll(ctx, 30*time.Second, func() error {
		ls, err := e.admin.Leases(ctx)
		if err != nil {
			return err
		}
		for _, l := range ls {
			switch {
			case !l.Online || l.DeviceName != a.device:
			case l.Service == "web":
				a.host = l.Hostname
			case l.Service == "src":
				a.srcPort = int(l.Port)
			case l.Service == "sink":
				a.sinkPort = int(l.Port)
			}
		}
		if a.srcPort == 0 || a.sinkPort == 0 || a.host == "" {
			return fmt.Errorf("the %s agent has not registered its services", a.label)
		}
		return nil
	}, a.proc, e.relay)
}

func (e *env) startRelay(ctx context.Context) error {
	var err error
	e.relay, err = harness.Start(harness.Cmd{Path: filepath.Join(e.bin, "tether-relay"), Env: []string{
		"TETHER_DATA_DIR=" + e.data, "TETHER_HTTP_ADDR=" + e.httpAddr,
		"TETHER_HTTPS_ADDR=" + e.httpsAddr, "TETHER_OPS_ADDR=" + e.opsAddr, "TETHER_ADMIN_ADDR=" + e.adminAddr,
		"TETHER_TCP_PORTS=" + e.tcpPorts, "TETHER_TCP_HOST=127.0.0.1", "TETHER_RELAY_ID=bench-relay",
		"TETHER_DRAIN_WINDOW=2s", "TETHER_LOG_LEVEL=warn",
		// The bench profiles the relay, and its whole fleet dials from one
		// address: what it measures is the relay, not the per-IP limits.
		"TETHER_PPROF=1", "TETHER_CONNECT_RATE=off", "TETHER_ENROLL_RATE=off"}})
	if err != nil {
		return err
	}
	if err := harness.WaitHTTP(ctx, "http://"+e.opsAddr+"/readyz", 200, 30*time.Second, e.relay); err != nil {
		return fmt.Errorf("relay: %w\n%s", err, e.relay.Logs())
	}
	return nil
}

// stopGrace bounds every process's shutdown.
const stopGrace = 20 * time.Second

func (e *env) close() {
	for _, a := range e.agents {
		if a.proc != nil {
			a.proc.Stop(stopGrace)
		}
	}
	if e.relay != nil {
		e.relay.Stop(stopGrace)
	}
	if e.origin != nil {
		e.origin.Close()
	}
	os.RemoveAll(e.dir)
}

// cpu is a process's CPU time so far (0 once it has exited).
func cpu(p *harness.Proc) time.Duration {
	d, _ := p.CPU()
	return d
}

// startOrigins starts the device's local services: HTTP (/1k, /blob?n=,
// /upload), a TCP source that writes n bytes (n sent as the first line),
// and a TCP sink that counts bytes until EOF and answers the count.
func (e *env) startOrigins() error {
	kib := strings.Repeat("x", 1024)
	mux := http.NewServeMux()
	mux.HandleFunc("/1k", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, kib) })
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		io.CopyN(w, zeros{}, n)
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	e.origin = &http.Server{Handler: mux}
	go e.origin.Serve(ln)
	e.originAddr = ln.Addr().String()
	e.srcAddr, err = serveTCP(func(c net.Conn) {
		line, _ := bufio.NewReader(c).ReadString('\n')
		n, _ := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		io.CopyN(c, zeros{}, n)
	})
	if err != nil {
		return err
	}
	e.sinkAddr, err = serveTCP(func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d\n", n)
	})
	return err
}

func serveTCP(handle func(net.Conn)) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String(), nil
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// client returns an HTTP client that sends every request to addr, with the
// relay's CA trusted.
func (e *env) client(addr string, keepAlive bool) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, n, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, n, addr)
		},
		TLSClientConfig:     &tls.Config{RootCAs: e.caPool},
		DisableKeepAlives:   !keepAlive,
		DisableCompression:  true,
		MaxIdleConnsPerHost: 100,
	}}
}

// relayLive is the relay's live memory: heap and goroutine stacks in use
// right after a garbage collection (RSS also holds garbage not yet
// collected). The relay's pprof endpoint runs the collection.
func (e *env) relayLive() int64 { return liveMem(e.opsAddr) }

// liveMem is relayLive of the relay whose ops listener is opsAddr.
func liveMem(opsAddr string) int64 {
	if resp, err := http.Get("http://" + opsAddr + "/debug/pprof/heap?gc=1"); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	resp, err := http.Get("http://" + opsAddr + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var total int64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && (f[0] == "go_memstats_heap_inuse_bytes" || f[0] == "go_memstats_stack_inuse_bytes") {
			v, _ := strconv.ParseFloat(f[1], 64)
			total += int64(v)
		}
	}
	return total
}
