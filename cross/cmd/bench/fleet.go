package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/cross/harness"
)

// fleet is a running tether-fleetsim and what it has reported so far (its
// stdout: one JSON event a line).
type fleet struct {
	proc *harness.Proc

	mu         sync.Mutex
	partial    []byte  // an incomplete last line
	registered []int64 // per agent: unix ns of its last registration
	gaveUp     []string
	up, down   int64 // bytes through the fleet's sockets at the last report
	at         int64 // unix ns of that report
}

// fleetEvent is one line of tether-fleetsim's output.
type fleetEvent struct {
	Agent      *int   `json:"agent"`
	Registered int64  `json:"registered"`
	Relay      string `json:"relay"` // the address the registered session was dialled to
	GaveUp     string `json:"gave_up"`
	Up         int64  `json:"up"`
	Down       int64  `json:"down"`
	At         int64  `json:"at"`
}

// startFleet starts n simulated agents enrolling with token.
func startFleet(e *env, n int, token string) (*fleet, error) {
	f := &fleet{registered: make([]int64, n)}
	p, err := harness.Start(harness.Cmd{Path: filepath.Join(e.bin, "tether-fleetsim"), Stdout: f,
		Args: []string{"-n", strconv.Itoa(n), "-relay", "wss://" + e.httpsAddr, "-ca", filepath.Join(e.data, "ca.pem"),
			"-state", filepath.Join(e.dir, fmt.Sprintf("fleet%d", n)), "-name", fmt.Sprintf("sim%d", n),
			"-services", "web=http://" + e.originAddr, "-heartbeat", e.s.heartbeat.String()},
		Env: []string{"TETHER_ENROLL_TOKEN=" + token}})
	f.proc = p
	return f, err
}

// Write takes the simulator's output.
func (f *fleet) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.partial = append(f.partial, p...)
	for {
		i := bytes.IndexByte(f.partial, '\n')
		if i < 0 {
			break
		}
		var ev fleetEvent
		if err := json.Unmarshal(f.partial[:i], &ev); err != nil {
			log.Printf("tether-fleetsim said %q", f.partial[:i])
		}
		f.partial = f.partial[i+1:]
		switch {
		case ev.Agent != nil && *ev.Agent >= 0 && *ev.Agent < len(f.registered):
			if ev.GaveUp != "" {
				f.gaveUp = append(f.gaveUp, fmt.Sprintf("agent %d: %s", *ev.Agent, ev.GaveUp))
			} else {
				f.registered[*ev.Agent] = ev.Registered
			}
		case ev.At != 0:
			f.up, f.down, f.at = ev.Up, ev.Down, ev.At
		}
	}
	return len(p), nil
}

// counted returns the bytes through the fleet's sockets and when the
// simulator counted them.
func (f *fleet) counted() (up, down int64, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.up, f.down, time.Unix(0, f.at)
}

// waitAll waits until every agent registered after since (unix ns).
func (f *fleet) waitAll(ctx context.Context, since int64, limit time.Duration) error {
	return harness.Poll(ctx, limit, func() error {
		f.mu.Lock()
		defer f.mu.Unlock()
		done := 0
		for _, t := range f.registered {
			if t > since {
				done++
			}
		}
		if done < len(f.registered) {
			return fmt.Errorf("%d of %d agents registered", done, len(f.registered))
		}
		return nil
	}, f.proc)
}

// benchFleet runs n idle agents in tether-fleetsim and measures the relay's
// memory per agent, the idle wire cost, and (storm) how fast they all come
// back after the relay restarts.
func benchFleet(ctx context.Context, e *env, r *report, n int, storm bool) error {
	tok, err := e.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: n, TTL: "1h"})
	if err != nil {
		return err
	}
	before, _, _ := e.relay.RSS()
	liveBefore := e.relayLive()
	begin := time.Now()
	f, err := startFleet(e, n, tok.Secret)
	if err != nil {
		return err
	}
	defer func() {
		if err := f.proc.Stop(stopGrace); err != nil {
			log.Print(err)
		}
	}()
	if err := f.waitAll(ctx, 0, 3*time.Minute); err != nil {
		return fmt.Errorf("%w\n%s", err, f.proc.Logs())
	}
	log.Printf("  %d agents enrolled and registered in %v", n, time.Since(begin).Round(time.Millisecond))
	settle(ctx, 3*time.Second)
	after, _, _ := e.relay.RSS()
	live := e.relayLive() - liveBefore
	r.add(row{name: fmt.Sprintf("relay memory per idle agent, %d agents (KB)", n), current: []float64{float64(after-before) / float64(n) / 1e3},
		goal: "≤ 30", note: fmt.Sprintf("RSS %.0f → %.0f MB; live heap + stacks %.1f KB per agent", float64(before)/1e6, float64(after)/1e6, float64(live)/float64(n)/1e3)})

	u0, d0, t0 := f.counted()
	settle(ctx, e.s.idleWindow)
	u1, d1, t1 := f.counted()
	secs := t1.Sub(t0).Seconds()
	perAgent := func(b int64) float64 { return float64(b) / float64(n) / secs }
	r.add(row{name: fmt.Sprintf("idle wire cost per agent, %d agents (B/s, both ways)", n), current: []float64{perAgent(u1 - u0 + d1 - d0)},
		goal: "≤ 20", note: fmt.Sprintf("up %.1f, down %.1f B/s at the socket, %v heartbeat, %.0f s window", perAgent(u1-u0), perAgent(d1-d0), e.s.heartbeat, secs)})

	if !storm {
		return nil
	}
	log.Printf("  restarting the relay under %d agents", n)
	if err := e.relay.Stop(stopGrace); err != nil {
		log.Print(err)
	}
	restarted := time.Now() // agents may register before the relay's /readyz is polled
	if err := e.startRelay(ctx); err != nil {
		return err
	}
	log.Printf("  new relay ready after %v", time.Since(restarted).Round(time.Millisecond))
	relayCPU0, simCPU0 := cpu(e.relay), cpu(f.proc)
	if err := f.waitAll(ctx, restarted.UnixNano(), 3*time.Minute); err != nil {
		return fmt.Errorf("%w\n%s", err, f.proc.Logs())
	}
	stormFor := time.Since(restarted)
	relayCPU, simCPU := cpu(e.relay)-relayCPU0, cpu(f.proc)-simCPU0
	f.mu.Lock()
	var waits []float64
	for _, t := range f.registered {
		waits = append(waits, time.Duration(t-restarted.UnixNano()).Seconds())
	}
	gaveUp := len(f.gaveUp)
	f.mu.Unlock()
	slices.Sort(waits)
	pct := func(p float64) float64 { return waits[min(len(waits)-1, int(p*float64(len(waits))))] }
	r.add(row{name: fmt.Sprintf("reconnect storm, %d agents: all registered again (s)", n), current: []float64{waits[len(waits)-1]}, goal: "≤ 30, p50 ≤ 5",
		note: fmt.Sprintf("p50 %.1f s, p99 %.1f s, max %.1f s after the relay was restarted (SIGTERM, then started again); %d gave up; "+
			"CPU meanwhile: relay %.1f s, simulator %.1f s, of %.1f s available on %d cores",
			pct(0.5), pct(0.99), waits[len(waits)-1], gaveUp, relayCPU.Seconds(), simCPU.Seconds(), stormFor.Seconds()*float64(numCPU()), numCPU())})
	return nil
}

func settle(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
