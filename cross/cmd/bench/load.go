package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

func mbps(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }

// tcpDownload reads n bytes from the source service at addr.
func tcpDownload(addr string, n int64) (float64, error) {
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	fmt.Fprintf(c, "%d\n", n)
	got, err := io.Copy(io.Discard, c)
	if err != nil || got != n {
		return 0, fmt.Errorf("tcp download from %s: %d of %d bytes: %v", addr, got, n, err)
	}
	return mbps(n, time.Since(start)), nil
}

// tcpUpload writes n bytes to the sink service at addr and waits for its count.
func tcpUpload(addr string, n int64) (float64, error) {
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := io.CopyN(c, zeros{}, n); err != nil {
		return 0, err
	}
	c.(*net.TCPConn).CloseWrite()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != strconv.FormatInt(n, 10) {
		return 0, fmt.Errorf("tcp upload to %s: sink counted %q: %v", addr, line, err)
	}
	return mbps(n, time.Since(start)), nil
}

func httpDownload(c *http.Client, url string, n int64) (float64, error) {
	start := time.Now()
	resp, err := c.Get(fmt.Sprintf("%s/blob?n=%d", url, n))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	got, err := io.Copy(io.Discard, resp.Body)
	if err != nil || got != n {
		return 0, fmt.Errorf("http download: %d of %d bytes: %v", got, n, err)
	}
	return mbps(n, time.Since(start)), nil
}

func httpUpload(c *http.Client, url string, n int64) (float64, error) {
	start := time.Now()
	req, _ := http.NewRequest("POST", url+"/upload", io.LimitReader(zeros{}, n))
	req.ContentLength = n
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != strconv.FormatInt(n, 10) {
		return 0, fmt.Errorf("http upload: origin counted %q", b)
	}
	return mbps(n, time.Since(start)), nil
}

// usage is the CPU time the relay and one agent spent on some work.
type usage struct{ relay, agent time.Duration }

// measureCPU runs fn and adds the relay's and a's CPU time to u.
func (u *usage) measureCPU(e *env, a *agentRun, fn func() error) error {
	r0, a0 := cpu(e.relay), cpu(a.proc)
	err := fn()
	u.relay += cpu(e.relay) - r0
	u.agent += cpu(a.proc) - a0
	return err
}

// benchThroughput measures single-stream throughput both ways, through a
// TCP lease and an HTTP lease, for each agent, and the CPU the relay and
// the agent spend per GB. Runs interleave: direct, then each agent.
func benchThroughput(ctx context.Context, e *env, r *report) error {
	n := e.s.bulk
	tc := e.client(e.httpAddr, true)
	dc := e.client(e.originAddr, true)
	type pair struct {
		name   string
		direct func() (float64, error)
		tunnel func(a *agentRun) (float64, error)
		down   bool
	}
	pairs := []pair{
		{"TCP lease, device→user (MB/s)", func() (float64, error) { return tcpDownload(e.srcAddr, n) },
			func(a *agentRun) (float64, error) { return tcpDownload(fmt.Sprintf("127.0.0.1:%d", a.srcPort), n) }, true},
		{"TCP lease, user→device (MB/s)", func() (float64, error) { return tcpUpload(e.sinkAddr, n) },
			func(a *agentRun) (float64, error) { return tcpUpload(fmt.Sprintf("127.0.0.1:%d", a.sinkPort), n) }, false},
		{"HTTP lease, download (MB/s)", func() (float64, error) { return httpDownload(dc, "http://"+e.originAddr, n) },
			func(a *agentRun) (float64, error) { return httpDownload(tc, "http://"+a.host, n) }, true},
		{"HTTP lease, upload (MB/s)", func() (float64, error) { return httpUpload(dc, "http://"+e.originAddr, n) },
			func(a *agentRun) (float64, error) { return httpUpload(tc, "http://"+a.host, n) }, false},
	}
	down, up := make([]usage, len(e.agents)), make([]usage, len(e.agents))
	var downBytes, upBytes int64
	for _, p := range pairs {
		var direct []float64
		tunnel := make([][]float64, len(e.agents))
		for range e.s.reps {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			v, err := p.direct()
			if err != nil {
				return err
			}
			direct = append(direct, v)
			for i, a := range e.agents {
				u := &up[i]
				if p.down {
					u = &down[i]
				}
				err := u.measureCPU(e, a, func() error {
					v, err := p.tunnel(a)
					tunnel[i] = append(tunnel[i], v)
					return err
				})
				if err != nil {
					return fmt.Errorf("%s agent: %w", a.label, err)
				}
			}
			if p.down {
				downBytes += n
			} else {
				upBytes += n
			}
		}
		r.add(e.row(row{name: p.name, direct: direct, higherBetter: true, goal: "≥ 1000"}, tunnel))
	}
	perGB := func(d time.Duration, b int64) float64 { return d.Seconds() / (float64(b) / 1e9) }
	for _, dir := range []struct {
		name, goal string
		u          []usage
		bytes      int64
	}{{"CPU s per GB device→user: relay + agent", "≤ 2.0", down, downBytes}, {"CPU s per GB user→device: relay + agent", "", up, upBytes}} {
		per := make([][]float64, len(e.agents))
		var notes []string
		for i, a := range e.agents {
			per[i] = []float64{perGB(dir.u[i].relay+dir.u[i].agent, dir.bytes)}
			notes = append(notes, fmt.Sprintf("%s: relay %.2f, agent %.2f", a.label, perGB(dir.u[i].relay, dir.bytes), perGB(dir.u[i].agent, dir.bytes)))
		}
		r.add(e.row(row{name: dir.name, goal: dir.goal, note: strings.Join(notes, "; ")}, per))
	}
	return nil
}

// wrkResult is what wrk reports.
type wrkResult struct {
	rps, p50, p99 float64 // requests/s, latency in ms
	requests      int64
}

var (
	wrkRPS  = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkReqs = regexp.MustCompile(`([0-9]+) requests in`)
	wrkPct  = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$`)
	heyPct  = regexp.MustCompile(`(?m)^\s+(50|99)% in ([0-9.]+) secs`)
)

func toMS(v float64, unit string) float64 {
	switch unit {
	case "us":
		return v / 1000
	case "s":
		return v * 1000
	}
	return v
}

func runWrk(ctx context.Context, d time.Duration, host, url string, closeConn bool) (wrkResult, error) {
	args := []string{"-t2", "-c50", "-d" + strconv.Itoa(int(d.Seconds())) + "s", "--latency", "-H", "Host: " + host}
	if closeConn {
		args = append(args, "-H", "Connection: close")
	}
	out, err := exec.CommandContext(ctx, "wrk", append(args, url)...).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %v\n%s", err, out)
	}
	var res wrkResult
	m := wrkRPS.FindSubmatch(out)
	if m == nil {
		return res, fmt.Errorf("wrk output without Requests/sec:\n%s", out)
	}
	res.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := wrkReqs.FindSubmatch(out); m != nil {
		res.requests, _ = strconv.ParseInt(string(m[1]), 10, 64)
	}
	for _, m := range wrkPct.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		if string(m[1]) == "50" {
			res.p50 = toMS(v, string(m[3]))
		} else {
			res.p99 = toMS(v, string(m[3]))
		}
	}
	if strings.Contains(string(out), "Non-2xx") {
		return res, fmt.Errorf("wrk saw non-2xx answers:\n%s", out)
	}
	return res, nil
}

// runHey runs a fixed 1000 req/s (10 workers × 100/s) and returns p50, p99 in ms.
func runHey(ctx context.Context, d time.Duration, host, url string) (float64, float64, error) {
	args := []string{"-z", strconv.Itoa(int(d.Seconds())) + "s", "-c", "10", "-q", "100", "-disable-compression"}
	if host != "" {
		args = append(args, "-host", host)
	}
	out, err := exec.CommandContext(ctx, "hey", append(args, url)...).CombinedOutput()
	if err != nil {
		return 0, 0, fmt.Errorf("hey: %v\n%s", err, out)
	}
	var p50, p99 float64
	for _, m := range heyPct.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		if string(m[1]) == "50" {
			p50 = v * 1000
		} else {
			p99 = v * 1000
		}
	}
	if p50 == 0 {
		return 0, 0, fmt.Errorf("hey output without a latency distribution:\n%s", out)
	}
	return p50, p99, nil
}

// benchHTTP measures HTTP through Host routing for each agent: keep-alive
// and a new connection per request, with the CPU per 10 000 requests and
// the agents' memory under load; then, for the current agent, latency at a
// fixed rate.
func benchHTTP(ctx context.Context, e *env, r *report) error {
	d := e.s.loadFor
	directURL, tunnelURL := "http://"+e.originAddr+"/1k", "http://"+e.httpAddr+"/1k"
	for _, closeConn := range []bool{false, true} {
		var direct []wrkResult
		tunnel := make([][]wrkResult, len(e.agents))
		use := make([]usage, len(e.agents))
		reqs := make([]int64, len(e.agents))
		for range e.s.reps {
			res, err := runWrk(ctx, d, e.originAddr, directURL, closeConn)
			if err != nil {
				return err
			}
			direct = append(direct, res)
			for i, a := range e.agents {
				err := use[i].measureCPU(e, a, func() error {
					res, err := runWrk(ctx, d, a.host, tunnelURL, closeConn)
					tunnel[i] = append(tunnel[i], res)
					reqs[i] += res.requests
					return err
				})
				if err != nil {
					return fmt.Errorf("%s agent: %w", a.label, err)
				}
			}
		}
		pick := func(f func(wrkResult) float64) ([]float64, [][]float64) {
			var dv []float64
			for _, w := range direct {
				dv = append(dv, f(w))
			}
			tv := make([][]float64, len(tunnel))
			for i, ws := range tunnel {
				for _, w := range ws {
					tv[i] = append(tv[i], f(w))
				}
			}
			return dv, tv
		}
		add := func(x row, f func(wrkResult) float64) {
			var perAgent [][]float64
			x.direct, perAgent = pick(f)
			r.add(e.row(x, perAgent))
		}
		rps := func(w wrkResult) float64 { return w.rps }
		if closeConn {
			add(row{name: "HTTP 1 KiB, new connection per request (req/s)", higherBetter: true, goal: "≥ 6 000"}, rps)
			continue
		}
		add(row{name: "HTTP 1 KiB, 50 keep-alive conns (req/s)", higherBetter: true, goal: "≥ 25 000"}, rps)
		add(row{name: "  latency p50 (ms)"}, func(w wrkResult) float64 { return w.p50 })
		add(row{name: "  latency p99 (ms)", goal: "≤ 5"}, func(w wrkResult) float64 { return w.p99 })
		per := make([][]float64, len(e.agents))
		var notes []string
		for i, a := range e.agents {
			per10k := func(c time.Duration) float64 { return c.Seconds() / float64(reqs[i]) * 10000 }
			per[i] = []float64{per10k(use[i].relay + use[i].agent)}
			notes = append(notes, fmt.Sprintf("%s: relay %.3f, agent %.3f", a.label, per10k(use[i].relay), per10k(use[i].agent)))
		}
		r.add(e.row(row{name: "CPU s per 10 000 requests: relay + agent", goal: "≤ 0.35", note: strings.Join(notes, "; ")}, per))
	}
	idle := make([][]float64, len(e.agents))
	var notes []string
	for i, a := range e.agents {
		_, peak, _ := a.proc.RSS()
		idle[i] = []float64{float64(a.idleRSS) / 1e6}
		notes = append(notes, fmt.Sprintf("%s peak %.1f MB", a.label, float64(peak)/1e6))
	}
	r.add(e.row(row{name: "agent RSS idle (MB)", goal: "≤ 8", note: "peak under load: " + strings.Join(notes, ", ")}, idle))

	cur := e.current()
	var d50, d99, t50, t99 []float64
	for range e.s.reps {
		a, b, err := runHey(ctx, d, "", directURL)
		if err != nil {
			return err
		}
		d50, d99 = append(d50, a), append(d99, b)
		a, b, err = runHey(ctx, d, cur.host, tunnelURL)
		if err != nil {
			return err
		}
		t50, t99 = append(t50, a), append(t99, b)
	}
	r.add(row{name: "HTTP at a fixed 1 000 req/s: p50 (ms)", direct: d50, current: t50, goal: "≤ 0.6", note: "current agent only"})
	r.add(row{name: "  p99 (ms)", direct: d99, current: t99, goal: "≤ 1.2"})
	return nil
}

// profileRelay captures 5 s of the relay's CPU profile under wrk load.
func profileRelay(ctx context.Context, e *env, path string) error {
	done := make(chan error, 1)
	go func() {
		_, err := runWrk(ctx, 7*time.Second, e.current().host, "http://"+e.httpAddr+"/1k", false)
		done <- err
	}()
	time.Sleep(time.Second)
	resp, err := http.Get("http://" + e.opsAddr + "/debug/pprof/profile?seconds=5")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		return err
	}
	return <-done
}
