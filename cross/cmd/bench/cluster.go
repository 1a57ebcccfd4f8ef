package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
)

// cluster is what make cluster runs, compactly: one nats-server on
// relay/deploy/nats.conf (authentication on, generated passwords), one
// control plane, and relays on 127.0.0.1, .2, .3 (the same ports on each).
type cluster struct {
	dir, bin             string
	natsURL              string
	relayPW              string
	adminAddr, cpOps     string
	httpPort, httpsPort  int
	clusterPort, opsPort int
	tcpPorts             string
	nats, cp             *harness.Proc
	relays               []*harness.Proc // relay i on 127.0.0.(i+1); nil until started
	admin                *httpapi.Client
	caFile               string
}

func port(addr string) int {
	i := strings.LastIndexByte(addr, ':')
	p, _ := strconv.Atoi(addr[i+1:])
	return p
}

func (c *cluster) host(i int) string    { return fmt.Sprintf("127.0.0.%d", i+1) }
func (c *cluster) relayID(i int) string { return fmt.Sprintf("bench-relay-%d", i+1) }
func (c *cluster) at(i, p int) string   { return fmt.Sprintf("%s:%d", c.host(i), p) }

// startCluster builds nats-server and the control plane next to the other
// binaries and starts NATS and the control plane (relays: startRelay).
func startCluster(ctx context.Context, e *env) (*cluster, error) {
	c := &cluster{dir: filepath.Join(e.dir, "cluster"), bin: e.bin}
	log.Printf("building nats-server and the control plane")
	cp, err := cross.Host("tether-controlplane")
	if err != nil {
		return nil, err
	}
	natsT := cross.Target{Binary: "nats-server", Pkg: "github.com/nats-io/nats-server/v2", GOARCH: runtime.GOARCH}
	if _, err := cross.Build(ctx, cross.Options{OutDir: e.bin, Targets: []cross.Target{cp, natsT}, Bare: true}); err != nil {
		return nil, err
	}
	root, err := cross.ModuleRoot(ctx)
	if err != nil {
		return nil, err
	}
	pw := func() string { b := make([]byte, 16); rand.Read(b); return fmt.Sprintf("%x", b) }
	cpPW, route := pw(), pw()
	c.relayPW = pw()
	hash := func(p string) string {
		h, _ := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
		return string(h)
	}
	natsAddr, natsMon := freeAddr(), freeAddr()
	c.natsURL = "nats://" + natsAddr
	c.nats, err = harness.Start(harness.Cmd{Path: filepath.Join(e.bin, "nats-server"),
		Args: []string{"-c", filepath.Join(root, "relay/deploy/nats.conf"), "-n", "bench-nats", "-a", "127.0.0.1",
			"-p", strconv.Itoa(port(natsAddr)), "-m", strconv.Itoa(port(natsMon)), "--cluster="},
		Env: []string{"TETHER_NATS_CONTROLPLANE_PASSWORD=" + hash(cpPW), "TETHER_NATS_RELAY_PASSWORD=" + hash(c.relayPW),
			"TETHER_NATS_ROUTE_PASSWORD=" + route, "TETHER_NATS_ROUTES=[]"}})
	if err != nil {
		return c, err
	}
	if err := harness.WaitHTTP(ctx, "http://"+natsMon+"/healthz", 200, 30*time.Second, c.nats); err != nil {
		return c, fmt.Errorf("nats-server: %w\n%s", err, c.nats.Logs())
	}
	first := 30000 + time.Now().Nanosecond()%9000
	c.tcpPorts = fmt.Sprintf("%d-%d", first, first+9)
	c.adminAddr, c.cpOps = freeAddr(), freeAddr()
	c.httpPort, c.httpsPort, c.clusterPort, c.opsPort = port(freeAddr()), port(freeAddr()), port(freeAddr()), port(freeAddr())
	cpData := filepath.Join(c.dir, "controlplane")
	c.caFile = filepath.Join(cpData, "ca.pem")
	c.cp, err = harness.Start(harness.Cmd{Path: filepath.Join(e.bin, "tether-controlplane"), Env: []string{
		"TETHER_NATS_URL=" + c.natsURL, "TETHER_NATS_USER=controlplane", "TETHER_NATS_PASSWORD=" + cpPW,
		"TETHER_DATA_DIR=" + cpData, "TETHER_DOMAIN=localhost", "TETHER_TCP_PORTS=" + c.tcpPorts,
		"TETHER_ADMIN_ADDR=" + c.adminAddr, "TETHER_OPS_ADDR=" + c.cpOps, "TETHER_LOG_LEVEL=warn"}})
	if err != nil {
		return c, err
	}
	if err := harness.WaitHTTP(ctx, "http://"+c.cpOps+"/readyz", 200, 30*time.Second, c.cp); err != nil {
		return c, fmt.Errorf("control plane: %w\n%s", err, c.cp.Logs())
	}
	token, err := os.ReadFile(filepath.Join(cpData, "admin-token"))
	if err != nil {
		return c, err
	}
	c.admin = &httpapi.Client{BaseURL: "http://" + c.adminAddr, Token: strings.TrimSpace(string(token))}
	return c, nil
}

// startRelay starts relay i on 127.0.0.(i+1) and waits until it is ready.
func (c *cluster) startRelay(ctx context.Context, i int) error {
	for len(c.relays) <= i {
		c.relays = append(c.relays, nil)
	}
	h := c.host(i)
	p, err := harness.Start(harness.Cmd{Path: filepath.Join(c.bin, "tether-relay"), Env: []string{
		"TETHER_RELAY_ID=" + c.relayID(i), "TETHER_DATA_DIR=" + filepath.Join(c.dir, c.relayID(i)),
		"TETHER_NATS_URL=" + c.natsURL, "TETHER_NATS_USER=relay", "TETHER_NATS_PASSWORD=" + c.relayPW,
		"TETHER_DOMAIN=localhost", "TETHER_HTTP_ADDR=" + c.at(i, c.httpPort), "TETHER_HTTPS_ADDR=" + c.at(i, c.httpsPort),
		"TETHER_CLUSTER_ADDR=" + c.at(i, c.clusterPort), "TETHER_OPS_ADDR=" + c.at(i, c.opsPort),
		"TETHER_TCP_HOST=" + h, "TETHER_TCP_PORTS=" + c.tcpPorts, "TETHER_DRAIN_WINDOW=1s", "TETHER_LOG_LEVEL=warn",
		"TETHER_CONNECT_RATE=off", "TETHER_ENROLL_RATE=off"}}) // the fleet dials from a few addresses: measure the relays, not the per-IP limits
	if err != nil {
		return err
	}
	c.relays[i] = p
	if err := harness.WaitHTTP(ctx, "http://"+c.at(i, c.opsPort)+"/readyz", 200, 30*time.Second, p); err != nil {
		return fmt.Errorf("%s: %w\n%s", c.relayID(i), err, p.Logs())
	}
	return nil
}

func (c *cluster) close() {
	for i := len(c.relays) - 1; i >= 0; i-- {
		if c.relays[i] != nil && !c.relays[i].Exited() {
			c.relays[i].Stop(stopGrace)
		}
	}
	for _, p := range []*harness.Proc{c.cp, c.nats} {
		if p != nil {
			p.Stop(stopGrace)
		}
	}
}

// benchCluster measures the forwarded path against the same-relay path
// (two relays), then a fleet over three relays when one is killed.
func benchCluster(ctx context.Context, e *env, r *report, fleetN int) error {
	c, err := startCluster(ctx, e)
	if c != nil {
		defer c.close()
	}
	if err != nil {
		return err
	}
	for i := range 2 {
		if err := c.startRelay(ctx, i); err != nil {
			return err
		}
	}
	if err := benchForwarded(ctx, e, c, r); err != nil {
		return fmt.Errorf("forwarded path: %w", err)
	}
	if err := c.startRelay(ctx, 2); err != nil {
		return err
	}
	return benchFailover(ctx, e, c, r, fleetN)
}

// benchForwarded: one agent holding its session on relay A only; the same
// measurements through A (same relay) and through B (user → B → A → agent),
// interleaved.
func benchForwarded(ctx context.Context, e *env, c *cluster, r *report) error {
	tok, err := c.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: 1, TTL: "1h"})
	if err != nil {
		return err
	}
	cur := e.current()
	ag, err := harness.Start(harness.Cmd{Path: cur.path, Env: []string{
		"TETHER_RELAY_URL=wss://" + c.at(0, c.httpsPort), "TETHER_RELAY_CA=" + c.caFile,
		"TETHER_ENROLL_TOKEN=" + tok.Secret, "TETHER_DEVICE_NAME=fwd", "TETHER_STATE_DIR=" + filepath.Join(c.dir, "fwd-agent"),
		"TETHER_SERVICES=web=http://" + e.originAddr + ",src=tcp://" + e.srcAddr, "TETHER_LOG_LEVEL=warn"}})
	if err != nil {
		return err
	}
	defer ag.Stop(stopGrace)
	var host string
	var srcPort int
	err = harness.Poll(ctx, 30*time.Second, func() error {
		ls, err := c.admin.Leases(ctx)
		if err != nil {
			return err
		}
		for _, l := range ls {
			if l.DeviceName == "fwd" && l.Online && l.Relay == c.relayID(0) {
				if l.Service == "web" {
					host = l.Hostname
				} else if l.Service == "src" {
					srcPort = int(l.Port)
				}
			}
		}
		if host == "" || srcPort == 0 {
			return fmt.Errorf("agent fwd not registered on %s", c.relayID(0))
		}
		return nil
	}, ag, c.relays[0], c.relays[1])
	if err != nil {
		return fmt.Errorf("%w\n%s", err, ag.Logs())
	}
	// relay B must know where the device is and have bound the TCP port
	err = harness.Poll(ctx, 30*time.Second, func() error {
		if _, err := tcpDownload(c.at(1, srcPort), 1<<10); err != nil {
			return err
		}
		resp, err := e.client(c.at(1, c.httpPort), true).Get("http://" + host + "/1k")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("through %s: %s", c.relayID(1), resp.Status)
		}
		return nil
	}, ag, c.relays[0], c.relays[1])
	if err != nil {
		return err
	}
	d := e.s.loadFor
	var sameRPS, fwdRPS, sameMBs, fwdMBs, same99, fwd99, add99 []float64
	for range e.s.reps {
		for j, dst := range []*[]float64{&sameRPS, &fwdRPS} {
			w, err := runWrk(ctx, d, host, "http://"+c.at(j, c.httpPort)+"/1k", false)
			if err != nil {
				return err
			}
			*dst = append(*dst, w.rps)
		}
		for j, dst := range []*[]float64{&sameMBs, &fwdMBs} {
			v, err := tcpDownload(c.at(j, srcPort), e.s.bulk)
			if err != nil {
				return err
			}
			*dst = append(*dst, v)
		}
		var p99 [2]float64
		for j, dst := range []*[]float64{&same99, &fwd99} {
			_, v, err := runHey(ctx, d, host, "http://"+c.at(j, c.httpPort)+"/1k")
			if err != nil {
				return err
			}
			*dst = append(*dst, v)
			p99[j] = v
		}
		add99 = append(add99, p99[1]-p99[0])
	}
	// direct: through relay A (same relay); current: through relay B (forwarded)
	r.add(row{name: "cluster, forwarded vs same relay: HTTP 1 KiB, 50 keep-alive conns (req/s)", direct: sameRPS, current: fwdRPS, higherBetter: true,
		goal: "≥ 0.7× same relay", note: "two relays, one NATS and control plane; the agent knows only relay A. *direct* column: through A (same relay); *current*: through B (user → B → A → agent); ratio = forwarded/same relay"})
	r.add(row{name: "  forwarded vs same relay: TCP lease, device→user (MB/s)", direct: sameMBs, current: fwdMBs, higherBetter: true,
		goal: "≥ 0.7× same relay", note: fmt.Sprintf("single stream, %d MiB", e.s.bulk>>20)})
	r.add(row{name: "  forwarded vs same relay: p99 at a fixed 1 000 req/s (ms)", direct: same99, current: fwd99, goal: "–"})
	r.add(row{name: "  p99 added by forwarding at 1 000 req/s (ms)", current: add99, goal: "≤ 1", note: "forwarded p99 − same-relay p99, per run"})
	return nil
}

// simFleet is the output of tether-fleetsim running the cluster's fleet.
type simFleet struct {
	proc    *harness.Proc
	mu      sync.Mutex
	partial []byte
	reg     []int64  // newest registration, unix ns
	relay   []string // relay address of that registration
	gaveUp  []string
	// after a relay is killed: each agent's first registration later than
	// since on another relay than avoid (unix ns; 0: none yet)
	since int64
	avoid string
	moved []int64
}

func (f *simFleet) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.partial = append(f.partial, p...)
	for {
		i := bytes.IndexByte(f.partial, '\n')
		if i < 0 {
			break
		}
		var ev fleetEvent
		json.Unmarshal(f.partial[:i], &ev)
		f.partial = f.partial[i+1:]
		if ev.Agent == nil || *ev.Agent < 0 || *ev.Agent >= len(f.reg) {
			continue
		}
		if ev.GaveUp != "" {
			f.gaveUp = append(f.gaveUp, fmt.Sprintf("agent %d: %s", *ev.Agent, ev.GaveUp))
		} else {
			f.reg[*ev.Agent], f.relay[*ev.Agent] = ev.Registered, ev.Relay
			if f.moved != nil && ev.Registered > f.since && ev.Relay != f.avoid && f.moved[*ev.Agent] == 0 {
				f.moved[*ev.Agent] = ev.Registered
			}
		}
	}
	return len(p), nil
}

// benchFailover: n simulated agents over three relays, each listing all
// three (rotated); kill -9 one relay and time until every device that was
// on it is registered on another and the control plane lists it online
// there.
func benchFailover(ctx context.Context, e *env, c *cluster, r *report, n int) error {
	tok, err := c.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: n, TTL: "1h"})
	if err != nil {
		return err
	}
	var before, liveBefore [3]int64
	for i := range 3 {
		before[i], _, _ = c.relays[i].RSS()
		liveBefore[i] = liveMem(c.at(i, c.opsPort))
	}
	var urls []string
	for i := range 3 {
		urls = append(urls, "wss://"+c.at(i, c.httpsPort))
	}
	f := &simFleet{reg: make([]int64, n), relay: make([]string, n)}
	begin := time.Now()
	f.proc, err = harness.Start(harness.Cmd{Path: filepath.Join(e.bin, "tether-fleetsim"), Stdout: f,
		Args: []string{"-n", strconv.Itoa(n), "-paced", "-name", "csim", "-relay", strings.Join(urls, ","), "-ca", c.caFile,
			"-state", filepath.Join(c.dir, "fleet"), "-services", "web=http://" + e.originAddr, "-heartbeat", e.s.heartbeat.String()},
		Env: []string{"TETHER_ENROLL_TOKEN=" + tok.Secret}})
	if err != nil {
		return err
	}
	defer f.proc.Stop(stopGrace)
	counts := func(since int64) (done int, on [3]int) {
		f.mu.Lock()
		defer f.mu.Unlock()
		for a, t := range f.reg {
			if t > since {
				done++
				for i := range 3 {
					if f.relay[a] == c.at(i, c.httpsPort) {
						on[i]++
					}
				}
			}
		}
		return
	}
	all := append([]*harness.Proc{f.proc}, c.relays...)
	err = harness.Poll(ctx, 6*time.Minute, func() error {
		if done, _ := counts(0); done < n {
			return fmt.Errorf("%d of %d agents registered", done, n)
		}
		return nil
	}, all...)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, f.proc.Logs())
	}
	log.Printf("  %d agents enrolled and registered over 3 relays in %v", n, time.Since(begin).Round(time.Millisecond))
	settle(ctx, 3*time.Second)
	_, on := counts(0)
	var perAgent []float64
	var notes []string
	for i := range 3 {
		after, _, _ := c.relays[i].RSS()
		live := liveMem(c.at(i, c.opsPort)) - liveBefore[i]
		if on[i] > 0 {
			perAgent = append(perAgent, float64(after-before[i])/float64(on[i])/1e3)
			notes = append(notes, fmt.Sprintf("%s: %d agents, RSS %.0f → %.0f MB, live heap + stacks %.1f KB per agent",
				c.relayID(i), on[i], float64(before[i])/1e6, float64(after)/1e6, float64(live)/float64(on[i])/1e3))
		}
	}
	r.add(row{name: fmt.Sprintf("cluster: relay memory per idle agent, %d agents on 3 relays (KB)", n), current: perAgent, goal: "≤ 30",
		note: "RSS growth per agent of each relay (median, min..max of the three); relays 1 and 2 had carried the forwarded-path load before: " + strings.Join(notes, "; ")})

	const victim = 2
	killedAddr := c.at(victim, c.httpsPort)
	f.mu.Lock()
	var moved []int
	for a := range f.reg {
		if f.relay[a] == killedAddr {
			moved = append(moved, a)
		}
	}
	f.mu.Unlock()
	log.Printf("  kill -9 %s (pid %d) under %d of its agents", c.relayID(victim), c.relays[victim].PID(), len(moved))
	killed := time.Now()
	f.mu.Lock()
	f.since, f.avoid, f.moved = killed.UnixNano(), killedAddr, make([]int64, n)
	f.mu.Unlock()
	if err := c.relays[victim].Signal(syscall.SIGKILL); err != nil {
		return err
	}
	survivors := []*harness.Proc{f.proc, c.relays[0], c.relays[1]}
	since := killed.UnixNano()
	err = harness.Poll(ctx, 2*time.Minute, func() error {
		f.mu.Lock()
		defer f.mu.Unlock()
		left := 0
		for _, a := range moved {
			if f.moved[a] == 0 {
				left++
			}
		}
		if left > 0 {
			return fmt.Errorf("%d of %d agents of %s not registered elsewhere yet", left, len(moved), c.relayID(victim))
		}
		return nil
	}, survivors...)
	if err != nil {
		return err
	}
	// the control plane's view: every device online, none on the dead relay
	err = harness.Poll(ctx, 2*time.Minute, func() error {
		ls, err := c.admin.Leases(ctx)
		if err != nil {
			return err
		}
		bad := 0
		for _, l := range ls {
			if strings.HasPrefix(l.DeviceName, "csim-") && (!l.Online || l.Relay == c.relayID(victim) || l.Relay == "") {
				bad++
			}
		}
		if bad > 0 {
			return fmt.Errorf("the control plane lists %d leases offline or on %s", bad, c.relayID(victim))
		}
		return nil
	}, survivors...)
	if err != nil {
		return err
	}
	servedAll := time.Since(killed)
	f.mu.Lock()
	var waits []float64
	for _, a := range moved {
		waits = append(waits, time.Duration(f.moved[a]-since).Seconds())
	}
	gaveUp := len(f.gaveUp)
	f.mu.Unlock()
	slices.Sort(waits)
	if len(waits) == 0 {
		return fmt.Errorf("no agent was on %s", c.relayID(victim))
	}
	pct := func(p float64) float64 { return waits[min(len(waits)-1, int(p*float64(len(waits))))] }
	// a few of them through the surviving relays, by hostname
	served := 0
	ls, _ := c.admin.Leases(ctx)
	for _, l := range ls {
		if served >= 20 || !strings.HasPrefix(l.DeviceName, "csim-") || l.Service != "web" {
			continue
		}
		resp, err := e.client(c.at(served%2, c.httpPort), false).Get("http://" + l.Hostname + "/1k")
		if err != nil || resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s through %s after the kill: %v %v", l.Hostname, c.relayID(served%2), err, resp)
		}
		resp.Body.Close()
		served++
	}
	r.add(row{name: fmt.Sprintf("cluster: kill -9 one of 3 relays, %d agents: all served again (s)", n), current: []float64{servedAll.Seconds()},
		goal: "≤ 30, p50 ≤ 5, 0 gave up",
		note: fmt.Sprintf("%d agents were on the killed relay; re-registered elsewhere p50 %.1f s, p99 %.1f s, max %.1f s; "+
			"the control plane listed every lease online on a surviving relay %.1f s after the kill; %d gave up; %d services answered through the survivors. "+
			"On loopback the kernel resets the dead relay's sockets at once: a host that vanishes is noticed only by heartbeats",
			len(moved), pct(0.5), pct(0.99), waits[len(waits)-1], servedAll.Seconds(), gaveUp, served)})
	r.add(row{name: "  p50 of re-registration after the kill (s)", current: []float64{pct(0.5)}, goal: "≤ 5"})
	r.add(row{name: "  agents that gave up", current: []float64{float64(gaveUp)}, goal: "0"})
	return nil
}
