// Command tether-fleetsim simulates a fleet of idle devices for the bench
// (make bench): it runs N agents in this one process, each the real agent
// package with its own key, state directory and wss session, spread over
// 127.0.0.x source addresses, and reports on stdout as JSON lines:
//
//	{"agent":17,"registered":1732255132000000000,"relay":"127.0.0.2:8443"}
//	                                                agent 17 got its leases (unix ns) on the
//	                                                relay dialled at that address
//	{"agent":17,"gave_up":"device revoked ..."}     agent 17's Run returned an error
//	{"up":123456,"down":654321,"at":1732255133000000000}
//	                                                bytes through all sockets so far
//	                                                (TLS and WebSocket framing included),
//	                                                every -report interval
//
// It is a benchmarking tool, not part of a release. SIGINT or SIGTERM
// stops every agent; it exits once they have all returned.
package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/agent"
)

func main() {
	var s sim
	flag.IntVar(&s.n, "n", 100, "number of agents")
	relays := flag.String("relay", "", "relay URL, wss://HOST:PORT, or a comma-separated list: agent i lists them starting at the i-th (required)")
	flag.BoolVar(&s.paced, "paced", false, "start 200 agents at a time, each batch once 90% of those before have registered (or after 10s)")
	ca := flag.String("ca", "", "PEM file of the CA to trust for the relay; empty: system roots")
	flag.StringVar(&s.token, "token", "", "enrollment token with at least -n uses, needed on the first run of a state dir; empty: $TETHER_ENROLL_TOKEN")
	flag.StringVar(&s.state, "state", "", "directory for the agents' state, one subdirectory each (required)")
	services := flag.String("services", "", "each agent's services, as TETHER_SERVICES (required)")
	flag.StringVar(&s.prefix, "name", "sim", "device names are NAME-0 ... NAME-(n-1)")
	flag.DurationVar(&s.heartbeat, "heartbeat", 15*time.Second, "heartbeat interval")
	flag.DurationVar(&s.report, "report", time.Second, "how often the byte counts are printed")
	flag.Parse()
	if s.token == "" {
		s.token = os.Getenv("TETHER_ENROLL_TOKEN")
	}
	log.SetPrefix("tether-fleetsim: ")
	log.SetFlags(0)
	if *relays != "" {
		s.relays = strings.Split(*relays, ",")
	}
	if s.n <= 0 || len(s.relays) == 0 || s.state == "" || *services == "" {
		flag.Usage()
		os.Exit(2)
	}
	var err error
	if s.services, err = agent.ParseServices(*services); err != nil {
		log.Fatalf("-services: %v", err)
	}
	if *ca != "" {
		pem, err := os.ReadFile(*ca)
		if err != nil {
			log.Fatal(err)
		}
		s.roots = x509.NewCertPool()
		if !s.roots.AppendCertsFromPEM(pem) {
			log.Fatalf("-ca: no certificate in %s", *ca)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	s.out = json.NewEncoder(os.Stdout)
	if err := s.run(ctx); err != nil {
		log.Fatal(err)
	}
}
