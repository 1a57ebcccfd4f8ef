package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
)

const (
	deviceName = "demo" // the agent's device: its web service is web-demo.<domain>
	webService = "web"  // the demo page as an HTTP service
	tcpService = "raw"  // the same page as a raw TCP service (a TCP lease)

	readyWithin = 45 * time.Second // for each process to be ready
	probeWithin = 10 * time.Second // for each way to the demo to answer
	stopGrace   = 15 * time.Second // after SIGTERM, before SIGKILL
)

// layout is where a cluster's processes listen and keep their state.
type layout struct {
	o        options
	state    string // absolute
	natsURL  string
	adminURL string
	caFile   string // the control plane's cluster CA: agents trust it
	hosts    []string
}

func (l layout) relayID(i int) string { return fmt.Sprintf("relay-%d", i+1) }
func (l layout) addr(host string, port int) string {
	return fmt.Sprintf("%s:%d", host, port)
}

// shown is a path under the state dir as the user gave it, for what we
// print.
func (l layout) shown(elem ...string) string {
	return filepath.Join(append([]string{filepath.Clean(l.o.state)}, elem...)...)
}

// passwords are the NATS roles' secrets, kept in <state>/nats.
type passwords struct{ controlplane, relay, route string }

func run(ctx context.Context, o options, out io.Writer) error {
	if o.relays < 0 || o.relays > 254 {
		return fmt.Errorf("-relays %d: want 0 to 254", o.relays)
	}
	// The cluster takes its settings from flags only: a TETHER_* variable
	// of the caller's shell must not reach the processes.
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "TETHER_") {
			os.Unsetenv(k)
		}
	}
	if !filepath.IsAbs(o.natsConf) {
		root, err := cross.ModuleRoot(ctx)
		if err != nil {
			return fmt.Errorf("%w (run make cluster in the repository, or give an absolute -nats-conf)", err)
		}
		o.natsConf = filepath.Join(root, o.natsConf)
	}
	if _, err := os.Stat(o.natsConf); err != nil {
		return fmt.Errorf("NATS configuration: %w", err)
	}
	if !o.noBuild {
		begin := time.Now()
		fmt.Fprintf(out, "building %s and nats-server into %s (release flags) ...\n", strings.Join(tetherBinaries, ", "), o.bin)
		if err := build(ctx, o.bin); err != nil {
			return err
		}
		fmt.Fprintf(out, "built in %v\n", time.Since(begin).Round(100*time.Millisecond))
	}
	state, err := filepath.Abs(o.state)
	if err != nil {
		return err
	}
	l := layout{
		o: o, state: state,
		natsURL:  fmt.Sprintf("nats://127.0.0.1:%d", o.natsPort),
		adminURL: fmt.Sprintf("http://127.0.0.1:%d", o.adminPort),
		caFile:   filepath.Join(state, "controlplane", "ca.pem"),
	}
	for i := range o.relays {
		l.hosts = append(l.hosts, fmt.Sprintf("127.0.0.%d", i+1))
	}
	bin := func(name string) string { return filepath.Join(o.bin, name) }

	pw, err := prepareState(state)
	if err != nil {
		return err
	}

	// Every variable each process gets must be one of its binary's
	// settings (its --help): a renamed setting stops us here, by name.
	var chk envCheck
	known := map[string]map[string]bool{}
	for _, b := range []string{"tether-controlplane", "tether-relay", "tether-agent"} {
		if known[b], err = settings(ctx, bin(b)); err != nil {
			return fmt.Errorf("%w (run without -no-build to build it)", err)
		}
	}
	cpEnv := chk.filter("tether-controlplane", known["tether-controlplane"], l.controlPlaneEnv(pw))
	var relayEnvs [][]string
	for i := range l.hosts {
		relayEnvs = append(relayEnvs, chk.filter("tether-relay", known["tether-relay"], l.relayEnv(i, pw)))
	}
	chk.filter("tether-agent", known["tether-agent"], l.agentEnv("127.0.0.1:1", "TETHER_ENROLL_TOKEN=x")) // made again once the demo listens
	if chk.missing != nil {
		return fmt.Errorf("the binaries in %s cannot run this cluster (each lists its settings in --help):\n  %s",
			o.bin, strings.Join(chk.missing, "\n  "))
	}
	for _, n := range chk.notes {
		fmt.Fprintf(out, "note: %s\n", n)
	}

	g := newGroup(filepath.Join(state, "logs"))
	defer func() {
		fmt.Fprintln(out, "stopping, last started first ...")
		g.stopAll(out, stopGrace)
		fmt.Fprintln(out, "stopped.")
	}()

	// NATS: the shipped configuration, on loopback, alone (no routes).
	nats, err := l.startNATS(g, bin("nats-server"), pw)
	if err != nil {
		return err
	}
	if err := harness.WaitHTTP(ctx, fmt.Sprintf("http://127.0.0.1:%d/healthz", o.natsMonitorPort), http.StatusOK, readyWithin, nats.proc); err != nil {
		return nats.failed(err)
	}
	nats.note = fmt.Sprintf("%s  monitoring http://127.0.0.1:%d", l.natsURL, o.natsMonitorPort)

	cp, err := g.start("controlplane", bin("tether-controlplane"), nil, cpEnv)
	if err != nil {
		return err
	}
	if err := harness.WaitHTTP(ctx, fmt.Sprintf("http://127.0.0.1:%d/readyz", o.cpOpsPort), http.StatusOK, readyWithin, cp.proc); err != nil {
		return cp.failed(err)
	}
	cp.note = fmt.Sprintf("admin %s  ops http://127.0.0.1:%d", l.adminURL, o.cpOpsPort)
	token, err := os.ReadFile(filepath.Join(state, "controlplane", "admin-token"))
	if err != nil {
		return fmt.Errorf("control plane admin token: %w", err)
	}
	admin := &httpapi.Client{BaseURL: l.adminURL, Token: strings.TrimSpace(string(token))}

	var relays []*member
	for i, host := range l.hosts {
		r, err := g.start(l.relayID(i), bin("tether-relay"), nil, relayEnvs[i])
		if err != nil {
			return err
		}
		r.note = fmt.Sprintf("https %s  cluster %s  ops http://%s/metrics", l.addr(host, o.httpsPort), l.addr(host, o.clusterPort), l.addr(host, o.opsPort))
		relays = append(relays, r)
	}
	for i, r := range relays {
		if err := harness.WaitHTTP(ctx, "http://"+l.addr(l.hosts[i], o.opsPort)+"/readyz", http.StatusOK, readyWithin, r.proc); err != nil {
			return r.failed(err)
		}
	}

	var demo *demoState
	if len(relays) > 0 {
		if demo, err = l.startDemo(ctx, g, bin("tether-agent"), admin, known["tether-agent"]); err != nil {
			return err
		}
		defer demo.closePage()
	}
	l.summary(ctx, out, g, demo)

	for {
		select {
		case <-ctx.Done():
			fmt.Fprintln(out)
			return nil
		case m := <-g.exited:
			fmt.Fprintf(out, "\n%s (pid %d) exited: %v; the others carry on (Ctrl-C stops them).\n%s", m.name, m.proc.PID(), exitReason(m.proc), m.tail(8))
		}
	}
}

func exitReason(p *harness.Proc) string {
	if err := p.Err(); err != nil {
		return err.Error()
	}
	return "exit status 0"
}

// prepareState makes the state dir (ignored by git, whatever its name)
// and the NATS passwords, generated on the first run.
func prepareState(state string) (passwords, error) {
	for _, d := range []string{"nats", "controlplane", "logs"} {
		if err := os.MkdirAll(filepath.Join(state, d), 0o700); err != nil {
			return passwords{}, err
		}
	}
	ignore := filepath.Join(state, ".gitignore")
	if _, err := os.Stat(ignore); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(ignore, []byte("# make cluster's state: secrets and data, never committed\n*\n"), 0o644); err != nil {
			return passwords{}, err
		}
	}
	var pw passwords
	for _, s := range []struct {
		role string
		dst  *string
	}{{"controlplane", &pw.controlplane}, {"relay", &pw.relay}, {"route", &pw.route}} {
		var err error
		if *s.dst, err = loadOrCreateSecret(filepath.Join(state, "nats", s.role+".password")); err != nil {
			return passwords{}, err
		}
	}
	return pw, nil
}

func loadOrCreateSecret(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	raw := make([]byte, 24)
	rand.Read(raw)
	secret := hex.EncodeToString(raw)
	return secret, os.WriteFile(path, []byte(secret+"\n"), 0o600)
}

// startNATS starts nats-server on the shipped configuration. The server
// holds bcrypt hashes of the roles' passwords (the clients the clear
// text). One node: no route listener (--cluster= turns it off), no routes.
func (l layout) startNATS(g *group, bin string, pw passwords) (*member, error) {
	var hashes [2]string
	for i, p := range []string{pw.controlplane, pw.relay} {
		h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.DefaultCost)
		if err != nil {
			return nil, err
		}
		hashes[i] = string(h)
	}
	env := []string{
		"TETHER_NATS_CONTROLPLANE_PASSWORD=" + hashes[0],
		"TETHER_NATS_RELAY_PASSWORD=" + hashes[1],
		"TETHER_NATS_ROUTE_PASSWORD=" + pw.route,
		"TETHER_NATS_ROUTES=[]",
	}
	args := []string{"-c", l.o.natsConf, "-n", "tether-nats-1", "-a", "127.0.0.1",
		"-p", fmt.Sprint(l.o.natsPort), "-m", fmt.Sprint(l.o.natsMonitorPort), "--cluster="}
	return g.start("nats-server", bin, args, env)
}

func (l layout) controlPlaneEnv(pw passwords) []string {
	return []string{
		"TETHER_NATS_URL=" + l.natsURL, "TETHER_NATS_USER=controlplane", "TETHER_NATS_PASSWORD=" + pw.controlplane,
		"TETHER_DATA_DIR=" + filepath.Join(l.state, "controlplane"), "TETHER_DOMAIN=" + l.o.domain,
		"TETHER_TCP_PORTS=" + l.o.tcpPorts,
		"TETHER_ADMIN_ADDR=" + l.addr("127.0.0.1", l.o.adminPort), "TETHER_OPS_ADDR=" + l.addr("127.0.0.1", l.o.cpOpsPort),
		"TETHER_LOG_FORMAT=text",
	}
}

// relayEnv is relay i's environment: its own address for every listener,
// the same ports as the others (as on three hosts), its own data dir.
func (l layout) relayEnv(i int, pw passwords) []string {
	host := l.hosts[i]
	return []string{
		"TETHER_RELAY_ID=" + l.relayID(i), "TETHER_DATA_DIR=" + filepath.Join(l.state, l.relayID(i)),
		"TETHER_NATS_URL=" + l.natsURL, "TETHER_NATS_USER=relay", "TETHER_NATS_PASSWORD=" + pw.relay,
		"TETHER_DOMAIN=" + l.o.domain, "TETHER_PUBLIC_NAMES=" + l.relayID(i) + "." + l.o.domain,
		"TETHER_HTTP_ADDR=" + l.addr(host, l.o.httpPort), "TETHER_HTTPS_ADDR=" + l.addr(host, l.o.httpsPort),
		"TETHER_CLUSTER_ADDR=" + l.addr(host, l.o.clusterPort), "TETHER_OPS_ADDR=" + l.addr(host, l.o.opsPort),
		"TETHER_TCP_HOST=" + host, "TETHER_TCP_PORTS=" + l.o.tcpPorts,
		"TETHER_DRAIN_WINDOW=1s", "TETHER_LOG_FORMAT=text",
	}
}

// agentEnv lists every relay, trusts the cluster CA and publishes the
// demo page as an HTTP and a TCP service.
func (l layout) agentEnv(demoAddr string, more ...string) []string {
	var urls []string
	for _, h := range l.hosts {
		urls = append(urls, "wss://"+l.addr(h, l.o.httpsPort))
	}
	return append([]string{
		"TETHER_RELAY_URL=" + strings.Join(urls, ","), "TETHER_RELAY_CA=" + l.caFile,
		"TETHER_STATE_DIR=" + filepath.Join(l.state, "agent"), "TETHER_DEVICE_NAME=" + deviceName,
		"TETHER_SERVICES=" + webService + "=http://" + demoAddr + "," + tcpService + "=tcp://" + demoAddr,
		"TETHER_LOG_FORMAT=text",
	}, more...)
}

// demoState is the demo device once it is served.
type demoState struct {
	agent     *member
	closePage func()
	web, raw  controlplane.Lease
}

// startDemo serves the demo page, starts the agent (enrolling it on the
// first run) and waits until the control plane lists its leases online.
func (l layout) startDemo(ctx context.Context, g *group, bin string, admin *httpapi.Client, known map[string]bool) (*demoState, error) {
	addr, closePage, err := serveDemoPage()
	if err != nil {
		return nil, err
	}
	d := &demoState{closePage: closePage}
	ok := false
	defer func() {
		if !ok {
			closePage()
		}
	}()
	var more []string
	if _, err := os.Stat(filepath.Join(l.state, "agent", "device.json")); errors.Is(err, os.ErrNotExist) {
		tok, err := admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: 1, TTL: "10m", Labels: map[string]string{"demo": "cluster"}})
		if err != nil {
			return nil, fmt.Errorf("create an enrollment token: %w", err)
		}
		more = append(more, "TETHER_ENROLL_TOKEN="+tok.Secret)
	}
	var chk envCheck
	if d.agent, err = g.start("agent", bin, nil, chk.filter("tether-agent", known, l.agentEnv(addr, more...))); err != nil {
		return nil, err
	}
	err = harness.Poll(ctx, readyWithin, func() error {
		ls, err := admin.Leases(ctx)
		if err != nil {
			return err
		}
		d.web, d.raw = controlplane.Lease{}, controlplane.Lease{}
		for _, le := range ls {
			if le.DeviceName != deviceName || !le.Online || le.Relay == "" {
				continue
			}
			switch le.Service {
			case webService:
				d.web = le
			case tcpService:
				d.raw = le
			}
		}
		if d.web.Hostname == "" || d.raw.Port == 0 {
			return fmt.Errorf("the control plane lists no online %s and %s leases of device %s", webService, tcpService, deviceName)
		}
		return nil
	}, d.agent.proc)
	if err != nil {
		return nil, d.agent.failed(err)
	}
	d.agent.note = fmt.Sprintf("device %s, session on %s; state %s", deviceName, d.web.Relay, l.shown("agent"))
	ok = true
	return d, nil
}

// summary prints how to reach the demo through every relay, each way
// tried here first, then the processes and where things are.
func (l layout) summary(ctx context.Context, out io.Writer, g *group, d *demoState) {
	o := l.o
	fmt.Fprintln(out)
	if d == nil {
		fmt.Fprintf(out, "  Tether cluster is running: NATS and a control plane, no relays (-relays 0).\n")
	} else {
		fmt.Fprintf(out, "  Tether cluster is running: NATS, a control plane, %d relays, and an agent (device %q)\n", len(l.hosts), deviceName)
		fmt.Fprintf(out, "  publishing a demo page. It lists every relay; its session is on %s.\n\n", d.web.Relay)
		fmt.Fprintf(out, "  The demo through each relay (tried just now: ok, or what the relay answered):\n")
		type line struct {
			p   probe
			err error
		}
		results := make([][]line, len(l.hosts))
		var wg sync.WaitGroup
		for i, h := range l.hosts {
			ps := []probe{
				httpProbe(d.web.Hostname, l.addr(h, o.httpPort)),
				httpsProbe(d.web.Hostname, l.addr(h, o.httpsPort), l.caFile, l.shown("controlplane", "ca.pem")),
				tcpProbe(l.addr(h, int(d.raw.Port))),
			}
			results[i] = make([]line, len(ps))
			for j, p := range ps {
				results[i][j].p = p
				wg.Go(func() { results[i][j].err = p.try(ctx, probeWithin) })
			}
		}
		wg.Wait()
		for i, h := range l.hosts {
			holds := ""
			if l.relayID(i) == d.web.Relay {
				holds = "  (holds the agent's session)"
			}
			fmt.Fprintf(out, "    %s on %s%s\n", l.relayID(i), h, holds)
			for j, r := range results[i] {
				status := "ok  "
				if r.err != nil {
					status = "FAIL"
				}
				kind := [...]string{"http ", "https", "tcp  "}[j]
				fmt.Fprintf(out, "      %s %s  %s\n", status, kind, r.p.curl)
				if r.err != nil {
					fmt.Fprintf(out, "           -> %v\n", r.err)
				}
			}
		}
		fmt.Fprintf(out, "    (the tcp line is the %s service's TCP lease, port %d, the same page over raw TCP)\n", tcpService, d.raw.Port)
	}

	if len(l.hosts) > 1 {
		fmt.Fprintf(out, "\n  Processes (kill -9 a relay and the agent moves to another; the rest carry on):\n")
	} else {
		fmt.Fprintf(out, "\n  Processes:\n")
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, m := range g.members {
		fmt.Fprintf(tw, "    %s\tpid %d\t%s\n", m.name, m.proc.PID(), m.note)
	}
	tw.Flush()
	fmt.Fprintf(out, `
  Admin   export TETHER_ADMIN_URL=%s TETHER_ADMIN_TOKEN_FILE=%s
          %s relays    %[3]s devices    %[3]s leases
  Agents  trust the cluster CA %s (TETHER_RELAY_CA), whichever relay they reach
  Logs    %s
  State   %s (a second make cluster brings back the same device and names; delete it to start afresh)

  Ctrl-C stops everything.
`, l.adminURL, shellQuote(l.shown("controlplane", "admin-token")), shellQuote(filepath.Join(o.bin, "tetherctl")),
		shellQuote(l.shown("controlplane", "ca.pem")), shellQuote(l.shown("logs"))+"/<process>.log", shellQuote(l.shown()))
}
