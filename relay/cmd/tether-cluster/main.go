// Command tether-cluster is what `make cluster` starts: a Tether cluster on
// this one machine, laid out as three hosts would run it. It builds the
// binaries the release way (and a real nats-server from the module in
// go.mod), then starts, each as its own process:
//
//   - nats-server with relay/deploy/nats.conf, authentication on, the
//     roles' passwords generated into the state dir;
//   - one tether-controlplane (its data dir holds the cluster CA, ca.pem);
//   - three tether-relay processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3,
//     the same ports on each address;
//   - a demo web page and a tether-agent that lists all three relays and
//     trusts the cluster CA;
//
// and prints how to reach the demo through any of the three relays, with
// what each relay answers right now. State lives in ./tether-cluster, so a
// second run brings back the same device and names. Ctrl-C stops every
// process it started, by PID, in reverse order. A relay killed meanwhile
// (kill -9, to watch the agent move) is reported and the rest carry on.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// options are the launcher's flags. The defaults are make cluster's; a
// test gives free ports and a temporary state dir.
type options struct {
	bin      string // where the binaries are (built unless noBuild)
	state    string // every process's data dir, secrets, logs
	natsConf string // NATS server configuration
	noBuild  bool
	domain   string
	// relays is how many relays run, on 127.0.0.1 … 127.0.0.N; 0 runs
	// NATS and the control plane alone (no agent either).
	relays int

	// Each relay listens on these ports, on its own address.
	httpPort, httpsPort, clusterPort, opsPort int
	tcpPorts                                  string
	// NATS and the control plane listen on 127.0.0.1.
	natsPort, natsMonitorPort, adminPort, cpOpsPort int
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == ownGroupArg {
		err := execInOwnGroup(os.Args[2:])
		fmt.Fprintln(os.Stderr, "tether-cluster:", err)
		os.Exit(127)
	}
	var o options
	flag.StringVar(&o.bin, "bin", "./bin", "directory of the binaries (built there unless -no-build)")
	flag.StringVar(&o.state, "state", "./tether-cluster", "state: data dirs, NATS passwords, logs")
	flag.StringVar(&o.natsConf, "nats-conf", "relay/deploy/nats.conf", "NATS server configuration (relative: to the module root)")
	flag.BoolVar(&o.noBuild, "no-build", false, "use the binaries in -bin as they are")
	flag.StringVar(&o.domain, "domain", "localhost", "base domain of the services' hostnames (TETHER_DOMAIN)")
	flag.IntVar(&o.relays, "relays", 3, "relays to run, on 127.0.0.1 … 127.0.0.N (0: NATS and the control plane only)")
	flag.IntVar(&o.httpPort, "http-port", 8080, "each relay's public HTTP port")
	flag.IntVar(&o.httpsPort, "https-port", 8443, "each relay's public HTTPS and agent port")
	flag.IntVar(&o.clusterPort, "cluster-port", 7444, "each relay's relay-to-relay port")
	flag.IntVar(&o.opsPort, "ops-port", 7071, "each relay's /metrics, /healthz, /readyz port")
	flag.StringVar(&o.tcpPorts, "tcp-ports", "20000-29999", "TCP lease range (every relay, on its own address)")
	flag.IntVar(&o.natsPort, "nats-port", 4222, "NATS client port on 127.0.0.1")
	flag.IntVar(&o.natsMonitorPort, "nats-monitor-port", 8222, "NATS monitoring port on 127.0.0.1")
	flag.IntVar(&o.adminPort, "admin-port", 7070, "control plane admin API port on 127.0.0.1")
	flag.IntVar(&o.cpOpsPort, "cp-ops-port", 7072, "control plane /metrics, /readyz port on 127.0.0.1")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "tether-cluster: unexpected argument %q\n", flag.Arg(0))
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, os.Stdout); err != nil && ctx.Err() == nil { // Ctrl-C while starting is no failure
		fmt.Fprintln(os.Stderr, "tether-cluster:", err)
		os.Exit(1)
	}
}
