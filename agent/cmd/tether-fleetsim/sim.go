package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/frames"
)

// sim is the simulated fleet.
type sim struct {
	n                 int
	relays            []string // agent i lists them starting at relays[i%len]
	token, state      string
	prefix            string
	paced             bool // start 200 at a time, once 90% of those before registered
	services          []agent.Service
	roots             *x509.CertPool
	heartbeat, report time.Duration
	up, down          atomic.Int64 // bytes through the sockets
	outMu             sync.Mutex
	out               *json.Encoder
}

// event is one line of output; zero fields are left out.
type event struct {
	Agent      *int   `json:"agent,omitempty"`
	Registered int64  `json:"registered,omitempty"`
	Relay      string `json:"relay,omitempty"` // the address the registered session was dialled to
	GaveUp     string `json:"gave_up,omitempty"`
	Up         int64  `json:"up,omitempty"`
	Down       int64  `json:"down,omitempty"`
	At         int64  `json:"at,omitempty"`
}

func (s *sim) emit(e event) {
	s.outMu.Lock()
	defer s.outMu.Unlock()
	s.out.Encode(e)
}

func (s *sim) run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { s.reportBytes(ctx) })
	quiet := slog.New(slog.DiscardHandler)
	var registered atomic.Int64 // agents registered at least once
	for i := range s.n {
		var once sync.Once
		var dialled atomic.Value // the relay address of the newest dial
		dialled.Store("")
		k := i % len(s.relays)
		a, err := agent.New(agent.Config{
			RelayURLs:         append(append([]string{}, s.relays[k:]...), s.relays[:k]...),
			EnrollToken:       s.token,
			StateDir:          filepath.Join(s.state, fmt.Sprint(i)),
			DeviceName:        fmt.Sprintf("%s-%d", s.prefix, i),
			Services:          s.services,
			RootCAs:           s.roots,
			HeartbeatInterval: s.heartbeat,
			Logger:            quiet,
			OnLeases: func([]frames.Lease) {
				once.Do(func() { registered.Add(1) })
				s.emit(event{Agent: &i, Registered: time.Now().UnixNano(), Relay: dialled.Load().(string)})
			},
			DialContext: s.dialer(i, &dialled),
		})
		if err != nil {
			return err
		}
		wg.Go(func() {
			if err := a.Run(ctx); err != nil {
				s.emit(event{Agent: &i, GaveUp: err.Error()})
			}
		})
		if i%200 != 199 {
			continue
		}
		// Devices arrive over time, not all in one instant. Paced, the
		// next 200 wait until most before them registered (or 10 s):
		// 10 000 agents enrolling at once on 2 shared cores mostly time
		// out and back off, which would measure that pile-up rather than
		// the idle fleet.
		wait := time.Now()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(20 * time.Millisecond):
			}
			if !s.paced || registered.Load() >= int64(i+1)*9/10 || time.Since(wait) > 10*time.Second {
				break
			}
		}
	}
	return nil
}

// dialer spreads the agents over source addresses 127.0.x.y (a source
// address has only about 28 000 ephemeral ports) and counts their bytes.
func (s *sim) dialer(i int, dialled *atomic.Value) func(ctx context.Context, network, addr string) (net.Conn, error) {
	local := &net.TCPAddr{IP: net.IPv4(127, 0, byte(1+i/50000), byte(2+i%200))}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		dialled.Store(addr)
		c, err := (&net.Dialer{LocalAddr: local, KeepAlive: -1}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, up: &s.up, down: &s.down}, nil
	}
}

func (s *sim) reportBytes(ctx context.Context) {
	t := time.NewTicker(s.report)
	defer t.Stop()
	for {
		s.emit(event{Up: s.up.Load(), Down: s.down.Load(), At: time.Now().UnixNano()})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// countingConn counts the bytes that cross a socket.
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
