package main

import (
	"bufio"
	"bytes"
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
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
)

// env is the system under test: origin services, a relay process and an
// agent process publishing the origins.
type env struct {
	s                   settings
	dir, bin, data      string
	httpAddr, httpsAddr string
	opsAddr, adminAddr  string
	tcpPorts            string
	origin              *http.Server
	originAddr          string
	srcAddr, sinkAddr   string
	relay, agent        *proc
	agentIdleRSS        int64  // right after it registered, before any load
	host                string // the web service's public hostname
	srcPort, sinkPort   int    // TCP leases
	caPool              *x509.CertPool
	admin               *httpapi.Client
}

func newEnv(ctx context.Context, s settings) (*env, error) {
	dir, err := os.MkdirTemp("", "tether-bench-")
	if err != nil {
		return nil, err
	}
	e := &env{s: s, dir: dir, bin: filepath.Join(dir, "bin"), data: filepath.Join(dir, "data")}
	log.Printf("building binaries")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", e.bin+"/",
		"./relay/cmd/tether-relay", "./agent/cmd/tether-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build: %v\n%s", err, out)
	}
	if err := e.startOrigins(); err != nil {
		return nil, err
	}
	e.httpAddr, e.httpsAddr, e.opsAddr, e.adminAddr = freeAddr(), freeAddr(), freeAddr(), freeAddr()
	first := 40000 + time.Now().Nanosecond()%10000
	e.tcpPorts = fmt.Sprintf("%d-%d", first, first+9)
	if err := e.startRelay(ctx); err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(filepath.Join(e.data, "ca.pem"))
	if err != nil {
		return nil, err
	}
	e.caPool = x509.NewCertPool()
	e.caPool.AppendCertsFromPEM(pem)
	token, _ := os.ReadFile(filepath.Join(e.data, "admin-token"))
	e.admin = &httpapi.Client{BaseURL: "http://" + e.adminAddr, Token: strings.TrimSpace(string(token))}
	tok, err := e.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: 1 << 20, TTL: "2h"})
	if err != nil {
		return nil, err
	}
	e.agent = startProc(e.bin+"/tether-agent",
		"TETHER_RELAY_URL=wss://"+e.httpsAddr, "TETHER_RELAY_CA="+filepath.Join(e.data, "ca.pem"),
		"TETHER_ENROLL_TOKEN="+tok.Secret, "TETHER_DEVICE_NAME=bench", "TETHER_STATE_DIR="+filepath.Join(dir, "agent"),
		"TETHER_SERVICES=web=http://"+e.originAddr+",src=tcp://"+e.srcAddr+",sink=tcp://"+e.sinkAddr,
		"TETHER_LOG_LEVEL=warn")
	deadline := time.Now().Add(30 * time.Second)
	for e.srcPort == 0 || e.sinkPort == 0 || e.host == "" {
		if time.Now().After(deadline) {
			return nil, errors.New("agent did not register within 30s")
		}
		time.Sleep(50 * time.Millisecond)
		ls, err := e.admin.Leases(ctx)
		if err != nil {
			continue
		}
		for _, l := range ls {
			switch {
			case !l.Online:
			case l.Service == "web":
				e.host = l.Hostname
			case l.Service == "src":
				e.srcPort = int(l.Port)
			case l.Service == "sink":
				e.sinkPort = int(l.Port)
			}
		}
	}
	settle(ctx, time.Second)
	e.agentIdleRSS, _ = e.agent.rss()
	return e, nil
}

func (e *env) startRelay(ctx context.Context) error {
	e.relay = startProc(e.bin+"/tether-relay", "TETHER_DATA_DIR="+e.data, "TETHER_HTTP_ADDR="+e.httpAddr,
		"TETHER_HTTPS_ADDR="+e.httpsAddr, "TETHER_OPS_ADDR="+e.opsAddr, "TETHER_ADMIN_ADDR="+e.adminAddr,
		"TETHER_TCP_PORTS="+e.tcpPorts, "TETHER_TCP_HOST=127.0.0.1", "TETHER_RELAY_ID=bench-relay",
		"TETHER_DRAIN_WINDOW=2s", "TETHER_LOG_LEVEL=warn")
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get("http://" + e.opsAddr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if e.relay.exited() {
			return fmt.Errorf("relay exited: %s", e.relay.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("relay not ready within 30s")
}

func (e *env) close() {
	if e.agent != nil {
		e.agent.stop()
	}
	if e.relay != nil {
		e.relay.stop()
	}
	if e.origin != nil {
		e.origin.Close()
	}
	os.RemoveAll(e.dir)
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

// proc is a process the bench started.
type proc struct {
	cmd    *exec.Cmd
	stderr *strings.Builder
	done   chan struct{}
}

func startProc(path string, env ...string) *proc {
	p := &proc{cmd: exec.Command(path), stderr: &strings.Builder{}, done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		log.Fatalf("start %s: %v", path, err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) stop() {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// cpu returns the process's user+system CPU time.
func (p *proc) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

// rss returns the process's resident set and its peak, in bytes.
func (p *proc) rss() (cur, peak int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			cur = v << 10
		case "VmHWM:":
			peak = v << 10
		}
	}
	return cur, peak
}

// relayLive is the relay's live memory: heap and goroutine stacks in use
// right after a garbage collection (RSS also holds garbage not yet
// collected). The relay's pprof endpoint runs the collection.
func (e *env) relayLive() int64 {
	if resp, err := http.Get("http://" + e.opsAddr + "/debug/pprof/heap?gc=1"); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	resp, err := http.Get("http://" + e.opsAddr + "/metrics")
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
