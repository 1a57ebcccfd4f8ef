package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/frames"
)

// simFleetArg makes the bench binary a simulated fleet for the cluster
// figures (run as its own process): tether-fleetsim gives every agent one
// relay URL, while these agents list every relay of the cluster, agent i
// starting at relay i mod n, so they spread and can move. Each
// registration line also names the relay address the session was dialled
// to, in tether-fleetsim's JSON-lines format otherwise. Agents start 200
// at a time, each batch once 90% of those before have registered: 10 000
// agents all enrolling at once on 2 shared cores mostly time out and back
// off (under 2 000 registered in 3 minutes), which would measure the
// enrollment pile-up rather than the idle fleet and the failover.
const simFleetArg = "internal-cluster-fleetsim"

type simEvent struct {
	Agent      *int   `json:"agent,omitempty"`
	Registered int64  `json:"registered,omitempty"`
	Relay      string `json:"relay,omitempty"`
	GaveUp     string `json:"gave_up,omitempty"`
}

func simFleetMain(args []string) {
	fs := flag.NewFlagSet(simFleetArg, flag.ExitOnError)
	n := fs.Int("n", 100, "agents")
	relays := fs.String("relays", "", "comma-separated relay URLs")
	ca := fs.String("ca", "", "CA PEM file")
	state := fs.String("state", "", "state dir")
	prefix := fs.String("name", "csim", "device name prefix")
	services := fs.String("services", "", "services, as TETHER_SERVICES")
	heartbeat := fs.Duration("heartbeat", 15*time.Second, "heartbeat interval")
	fs.Parse(args)
	log.SetPrefix("bench fleet: ")
	svcs, err := agent.ParseServices(*services)
	if err != nil {
		log.Fatal(err)
	}
	pem, err := os.ReadFile(*ca)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	urls := strings.Split(*relays, ",")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var mu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	emit := func(e simEvent) { mu.Lock(); out.Encode(e); mu.Unlock() }
	quiet := slog.New(slog.DiscardHandler)
	var wg sync.WaitGroup
	var registered atomic.Int64 // agents registered at least once
	for i := range *n {
		var once sync.Once
		rotated := append(append([]string{}, urls[i%len(urls):]...), urls[:i%len(urls)]...)
		var dialled atomic.Value // the relay address of the newest dial
		dialled.Store("")
		local := &net.TCPAddr{IP: net.IPv4(127, 0, byte(1+i/50000), byte(10+i%200))}
		a, err := agent.New(agent.Config{
			RelayURLs: rotated, EnrollToken: os.Getenv("TETHER_ENROLL_TOKEN"),
			StateDir: filepath.Join(*state, fmt.Sprint(i)), DeviceName: fmt.Sprintf("%s-%d", *prefix, i),
			Services: svcs, RootCAs: roots, HeartbeatInterval: *heartbeat, Logger: quiet,
			OnLeases: func([]frames.Lease) {
				once.Do(func() { registered.Add(1) })
				emit(simEvent{Agent: &i, Registered: time.Now().UnixNano(), Relay: dialled.Load().(string)})
			},
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				dialled.Store(addr)
				return (&net.Dialer{LocalAddr: local, KeepAlive: -1}).DialContext(ctx, network, addr)
			},
		})
		if err != nil {
			log.Fatal(err)
		}
		wg.Go(func() {
			if err := a.Run(ctx); err != nil {
				emit(simEvent{Agent: &i, GaveUp: err.Error()})
			}
		})
		if i%200 == 199 { // paced: the next 200 once most of these have registered (or 10 s)
			for wait := time.Now(); registered.Load() < int64(i+1)*9/10 && time.Since(wait) < 10*time.Second && ctx.Err() == nil; {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	wg.Wait()
}
