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

// measure runs fn reps times and returns the figures.
func measure(reps int, fn func() (float64, error)) ([]float64, error) {
	var out []float64
	for range reps {
		v, err := fn()
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

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

// benchThroughput measures single-stream throughput both ways, through a
// TCP lease and an HTTP lease, and the CPU the relay and agent spend per GB.
func benchThroughput(ctx context.Context, e *env, r *report) error {
	n := e.s.bulk
	tunnelURL := "http://" + e.host
	tc := e.client(e.httpAddr, true)
	dc := e.client(e.originAddr, true)
	src := fmt.Sprintf("127.0.0.1:%d", e.srcPort)
	sink := fmt.Sprintf("127.0.0.1:%d", e.sinkPort)
	type pair struct {
		name           string
		direct, tunnel func() (float64, error)
		down           bool
	}
	pairs := []pair{
		{"TCP lease, device→user (MB/s)", func() (float64, error) { return tcpDownload(e.srcAddr, n) }, func() (float64, error) { return tcpDownload(src, n) }, true},
		{"TCP lease, user→device (MB/s)", func() (float64, error) { return tcpUpload(e.sinkAddr, n) }, func() (float64, error) { return tcpUpload(sink, n) }, false},
		{"HTTP lease, download (MB/s)", func() (float64, error) { return httpDownload(dc, "http://"+e.originAddr, n) }, func() (float64, error) { return httpDownload(tc, tunnelURL, n) }, true},
		{"HTTP lease, upload (MB/s)", func() (float64, error) { return httpUpload(dc, "http://"+e.originAddr, n) }, func() (float64, error) { return httpUpload(tc, tunnelURL, n) }, false},
	}
	var downCPU, upCPU [2]time.Duration // relay, agent
	var downBytes, upBytes int64
	for _, p := range pairs {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		direct, err := measure(e.s.reps, p.direct)
		if err != nil {
			return err
		}
		r0, a0 := e.relay.cpu(), e.agent.cpu()
		tunnel, err := measure(e.s.reps, p.tunnel)
		if err != nil {
			return err
		}
		dr, da := e.relay.cpu()-r0, e.agent.cpu()-a0
		if p.down {
			downCPU[0] += dr
			downCPU[1] += da
			downBytes += n * int64(e.s.reps)
		} else {
			upCPU[0] += dr
			upCPU[1] += da
			upBytes += n * int64(e.s.reps)
		}
		r.add(row{name: p.name, direct: direct, tunnel: tunnel, higherBetter: true, goal: "≥ 1000"})
	}
	perGB := func(d time.Duration, b int64) []float64 { return []float64{d.Seconds() / (float64(b) / 1e9)} }
	r.add(row{name: "CPU s per GB device→user: relay + agent", tunnel: perGB(downCPU[0]+downCPU[1], downBytes), goal: "≤ 2.0", note: fmt.Sprintf("relay %.2f, agent %.2f", perGB(downCPU[0], downBytes)[0], perGB(downCPU[1], downBytes)[0])})
	r.add(row{name: "CPU s per GB user→device: relay + agent", tunnel: perGB(upCPU[0]+upCPU[1], upBytes), note: fmt.Sprintf("relay %.2f, agent %.2f", perGB(upCPU[0], upBytes)[0], perGB(upCPU[1], upBytes)[0])})
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

// benchHTTP measures HTTP through Host routing: keep-alive, a new
// connection per request, and latency at a fixed rate; with the CPU per
// 10 000 requests and the agent's memory under load.
func benchHTTP(ctx context.Context, e *env, r *report) error {
	d := e.s.loadFor
	directURL, tunnelURL := "http://"+e.originAddr+"/1k", "http://"+e.httpAddr+"/1k"
	idle := e.agentIdleRSS
	for _, closeConn := range []bool{false, true} {
		var dr, tr []wrkResult
		var cpuRelay, cpuAgent time.Duration
		var reqs int64
		for range e.s.reps {
			res, err := runWrk(ctx, d, e.originAddr, directURL, closeConn)
			if err != nil {
				return err
			}
			dr = append(dr, res)
			r0, a0 := e.relay.cpu(), e.agent.cpu()
			res, err = runWrk(ctx, d, e.host, tunnelURL, closeConn)
			if err != nil {
				return err
			}
			cpuRelay += e.relay.cpu() - r0
			cpuAgent += e.agent.cpu() - a0
			reqs += res.requests
			tr = append(tr, res)
		}
		pick := func(rs []wrkResult, f func(wrkResult) float64) []float64 {
			var out []float64
			for _, r := range rs {
				out = append(out, f(r))
			}
			return out
		}
		rps := func(w wrkResult) float64 { return w.rps }
		p50 := func(w wrkResult) float64 { return w.p50 }
		p99 := func(w wrkResult) float64 { return w.p99 }
		if !closeConn {
			r.add(row{name: "HTTP 1 KiB, 50 keep-alive conns (req/s)", direct: pick(dr, rps), tunnel: pick(tr, rps), higherBetter: true, goal: "≥ 25 000"})
			r.add(row{name: "  latency p50 (ms)", direct: pick(dr, p50), tunnel: pick(tr, p50)})
			r.add(row{name: "  latency p99 (ms)", direct: pick(dr, p99), tunnel: pick(tr, p99), goal: "≤ 5"})
			per10k := func(c time.Duration) float64 { return c.Seconds() / float64(reqs) * 10000 }
			r.add(row{name: "CPU s per 10 000 requests: relay + agent", tunnel: []float64{per10k(cpuRelay + cpuAgent)}, goal: "≤ 0.35",
				note: fmt.Sprintf("relay %.3f, agent %.3f", per10k(cpuRelay), per10k(cpuAgent))})
		} else {
			r.add(row{name: "HTTP 1 KiB, new connection per request (req/s)", direct: pick(dr, rps), tunnel: pick(tr, rps), higherBetter: true, goal: "≥ 6 000"})
		}
	}
	_, peak := e.agent.rss()
	r.add(row{name: "agent RSS idle / peak under load (MB)", tunnel: []float64{float64(idle) / 1e6}, note: fmt.Sprintf("peak %.1f MB", float64(peak)/1e6), goal: "≤ 8"})

	var d50, d99, t50, t99 []float64
	for range e.s.reps {
		a, b, err := runHey(ctx, d, "", directURL)
		if err != nil {
			return err
		}
		d50, d99 = append(d50, a), append(d99, b)
		a, b, err = runHey(ctx, d, e.host, tunnelURL)
		if err != nil {
			return err
		}
		t50, t99 = append(t50, a), append(t99, b)
	}
	r.add(row{name: "HTTP at a fixed 1 000 req/s: p50 (ms)", direct: d50, tunnel: t50, goal: "≤ 0.6"})
	r.add(row{name: "  p99 (ms)", direct: d99, tunnel: t99, goal: "≤ 1.2"})
	return nil
}

// profileRelay captures 5 s of the relay's CPU profile under wrk load.
func profileRelay(ctx context.Context, e *env, path string) error {
	done := make(chan error, 1)
	go func() { _, err := runWrk(ctx, 7*time.Second, e.host, "http://"+e.httpAddr+"/1k", false); done <- err }()
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
