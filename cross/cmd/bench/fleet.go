package main

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/frames"
)

// countingConn counts the bytes that cross a socket, TLS and WebSocket
// framing included.
type countingConn struct {
	net.Conn
	up, down *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.down.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.up.Add(int64(n))
	return n, err
}

// simAgent is one simulated device.
type simAgent struct {
	registered atomic.Int64 // unix nanos of the last registration
	gaveUp     atomic.Bool
}

// benchFleet runs n idle agents in this process and measures the relay's
// memory per agent, the idle wire cost, and (storm) how fast they all come
// back after the relay restarts.
func benchFleet(ctx context.Context, e *env, r *report, n int, storm bool) error {
	tok, err := e.admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: n, TTL: "1h"})
	if err != nil {
		return err
	}
	var up, down atomic.Int64
	sims := make([]*simAgent, n)
	fctx, stopFleet := context.WithCancel(ctx)
	defer stopFleet()
	var wg sync.WaitGroup
	before, _ := e.relay.rss()
	liveBefore := e.relayLive()
	quiet := slog.New(slog.DiscardHandler)
	begin := time.Now()
	for i := range n {
		sim := &simAgent{}
		sims[i] = sim
		local := &net.TCPAddr{IP: net.IPv4(127, 0, byte(1+i/50000), byte(2+i%200))}
		cfg := agent.Config{
			RelayURLs:   []string{"wss://" + e.httpsAddr},
			EnrollToken: tok.Secret,
			StateDir:    filepath.Join(e.dir, fmt.Sprintf("fleet%d", n), fmt.Sprint(i)),
			DeviceName:  fmt.Sprintf("sim%d-%d", n, i),
			Services:    []agent.Service{{Name: "web", Proto: "http", Addr: e.originAddr}},
			RootCAs:     e.caPool,
			Logger:      quiet,
			OnLeases:    func([]frames.Lease) { sim.registered.Store(time.Now().UnixNano()) },
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := (&net.Dialer{LocalAddr: local, KeepAlive: -1}).DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return &countingConn{Conn: c, up: &up, down: &down}, nil
			},
		}
		a, err := agent.New(cfg)
		if err != nil {
			return err
		}
		wg.Go(func() {
			if err := a.Run(fctx); err != nil {
				sim.gaveUp.Store(true)
				log.Printf("simulated agent %d gave up: %v", i, err)
			}
		})
		if i%200 == 199 {
			time.Sleep(20 * time.Millisecond) // devices arrive over time, not all in one instant
		}
	}
	defer func() {
		stopFleet()
		wg.Wait()
	}()
	if err := waitAll(ctx, sims, 0, 3*time.Minute); err != nil {
		return err
	}
	log.Printf("  %d agents enrolled and registered in %v", n, time.Since(begin).Round(time.Millisecond))
	settle(ctx, 3*time.Second)
	after, _ := e.relay.rss()
	live := e.relayLive() - liveBefore
	r.add(row{name: fmt.Sprintf("relay memory per idle agent, %d agents (KB)", n), tunnel: []float64{float64(after-before) / float64(n) / 1e3},
		goal: "≤ 30", note: fmt.Sprintf("RSS %.0f → %.0f MB; live heap + stacks %.1f KB per agent", float64(before)/1e6, float64(after)/1e6, float64(live)/float64(n)/1e3)})

	u0, d0, t0 := up.Load(), down.Load(), time.Now()
	settle(ctx, e.s.idleWindow)
	secs := time.Since(t0).Seconds()
	perAgent := func(b int64) float64 { return float64(b) / float64(n) / secs }
	r.add(row{name: fmt.Sprintf("idle wire cost per agent, %d agents (B/s, both ways)", n), tunnel: []float64{perAgent(up.Load() - u0 + down.Load() - d0)},
		goal: "≤ 20", note: fmt.Sprintf("up %.1f, down %.1f B/s at the socket, %v heartbeat, %.0f s window", perAgent(up.Load()-u0), perAgent(down.Load()-d0), e.s.heartbeat, secs)})

	if !storm {
		return nil
	}
	log.Printf("  restarting the relay under %d agents", n)
	e.relay.stop()
	restarted := time.Now() // agents may register before the relay's /readyz is polled
	if err := e.startRelay(ctx); err != nil {
		return err
	}
	log.Printf("  new relay ready after %v", time.Since(restarted).Round(time.Millisecond))
	relayCPU0, simCPU0 := e.relay.cpu(), selfCPU()
	if err := waitAll(ctx, sims, restarted.UnixNano(), 3*time.Minute); err != nil {
		return err
	}
	stormFor := time.Since(restarted)
	relayCPU, simCPU := e.relay.cpu()-relayCPU0, selfCPU()-simCPU0
	ready := restarted
	var waits []float64
	gaveUp := 0
	for _, s := range sims {
		waits = append(waits, time.Duration(s.registered.Load()-ready.UnixNano()).Seconds())
		if s.gaveUp.Load() {
			gaveUp++
		}
	}
	slices.Sort(waits)
	pct := func(p float64) float64 { return waits[min(len(waits)-1, int(p*float64(len(waits))))] }
	r.add(row{name: fmt.Sprintf("reconnect storm, %d agents: all registered again (s)", n), tunnel: []float64{waits[len(waits)-1]}, goal: "≤ 30, p50 ≤ 5",
		note: fmt.Sprintf("p50 %.1f s, p99 %.1f s, max %.1f s after the relay was restarted (SIGTERM, then started again); %d gave up; "+
			"CPU meanwhile: relay %.1f s, simulator %.1f s, of %.1f s available on %d cores",
			pct(0.5), pct(0.99), waits[len(waits)-1], gaveUp, relayCPU.Seconds(), simCPU.Seconds(), stormFor.Seconds()*float64(numCPU()), numCPU())})
	return nil
}

// waitAll waits until every agent registered after since (unix nanos).
func waitAll(ctx context.Context, sims []*simAgent, since int64, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		done := 0
		for _, s := range sims {
			if s.registered.Load() > since {
				done++
			}
		}
		if done == len(sims) {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%d of %d agents registered within %v", done, len(sims), limit)
		}
		settle(ctx, 50*time.Millisecond)
	}
}

func settle(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// selfCPU is this process's user+system CPU time.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
