// Command tether-relay is Tether's public edge. By default it is a complete
// server in one process: it embeds a NATS server and the control plane
// (state in TETHER_DATA_DIR). With TETHER_NATS_URL it joins a cluster whose
// control plane runs as tether-controlplane.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/controlplane/ops"
	"github.com/tetherfleet/tether/frames/cli"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/replica"
)

var version = "dev"

const about = `tether-relay: the public edge of Tether. Agents connect to wss://<relay>/_tether/connect;
public users reach device services at https://SERVICE-DEVICE.<domain> and on leased TCP ports.
Standalone (embedded NATS and control plane) unless TETHER_NATS_URL is set.`

type spec struct {
	Domain           string        `split_words:"true" default:"localhost" desc:"base domain for service hostnames (SERVICE-DEVICE.<domain>)"`
	HTTPAddr         string        `split_words:"true" default:":8080" desc:"public plain-HTTP listener"`
	HTTPSAddr        string        `split_words:"true" default:":8443" desc:"public HTTPS and agent wss listener"`
	TLSCert          string        `split_words:"true" desc:"certificate file (PEM); empty: the relay issues its own under the cluster CA (agents trust <data dir>/ca.pem)"`
	TLSKey           string        `split_words:"true" desc:"key file of TLS_CERT"`
	TCPPorts         string        `split_words:"true" default:"20000-29999" desc:"port range for TCP leases (each relay listens on every leased port)"`
	MaxServices      int           `split_words:"true" default:"32" desc:"leases (hostnames and TCP ports) one device may hold (standalone only)"`
	LeaseQuarantine  time.Duration `split_words:"true" default:"168h" desc:"a released hostname or port is leased to nobody for this long (standalone only)"`
	TCPHost          string        `split_words:"true" desc:"address TCP lease listeners bind; empty: all interfaces"`
	DataDir          string        `split_words:"true" default:"./tether-data" desc:"relay.db (what the relay knows of the cluster), its certificates, the cluster root ca.pem; standalone also the control plane's files"`
	NATSURL          string        `envconfig:"NATS_URL" desc:"external NATS server(s), comma-separated (cluster mode); empty: embedded NATS and control plane"`
	NATSUser         string        `envconfig:"NATS_USER" desc:"NATS user (relay in relay/deploy/nats.conf)"`
	NATSPassword     string        `envconfig:"NATS_PASSWORD" desc:"NATS password"`
	NATSPasswordFile string        `envconfig:"NATS_PASSWORD_FILE" desc:"file holding the NATS password"`
	NATSCreds        string        `envconfig:"NATS_CREDS" desc:"NATS .creds file (instead of user and password)"`
	NATSCA           string        `envconfig:"NATS_CA" desc:"PEM file of the CA of the NATS servers' TLS certificates"`
	RelayID          string        `split_words:"true" desc:"this relay's name in the cluster, one DNS label (a-z, 0-9, inner -); empty: the hostname up to its first dot, lower-cased"`
	PublicNames      string        `split_words:"true" desc:"comma-separated hostnames of this relay itself: its certificate covers them, and they are never leased to a device"`
	ClusterAddr      string        `split_words:"true" default:"127.0.0.1:7444" desc:"relay-to-relay listener, advertised to peers: the address they reach this relay on, not a wildcard (cluster mode only)"`
	AdminAddr        string        `split_words:"true" default:"127.0.0.1:7070" desc:"admin API of the embedded control plane (standalone only)"`
	AdminToken       string        `split_words:"true" desc:"admin bearer token; empty: generated into <data dir>/admin-token"`
	AdminTokenFile   string        `split_words:"true" desc:"file holding the admin token"`
	ReleaseKeys      string        `split_words:"true" desc:"comma-separated minisign public keys (RW...) of agent releases: only releases they sign are offered to agents, served and embedded in /install.sh (standalone: also the only ones published); empty: none"`
	OpsAddr          string        `split_words:"true" default:"127.0.0.1:7071" desc:"/metrics, /healthz, /readyz: unauthenticated, so loopback unless exposed on purpose (README: Operations)"`
	Pprof            bool          `envconfig:"PPROF" desc:"also serve /debug/pprof on the ops listener (1 or true); off: profiles show memory contents"`
	ConnectRate      string        `split_words:"true" default:"100/s" desc:"agent connections per client address (IPv6: per /64), sustained: N/s, N/m, N/h, or off; beyond: 429 with Retry-After"`
	ConnectBurst     int           `split_words:"true" default:"2000" desc:"agent connections one client address may make at once (a fleet behind one NAT reconnecting)"`
	EnrollRate       string        `split_words:"true" default:"1/s" desc:"enrollment attempts per client address, sustained: N/s, N/m, N/h, or off"`
	EnrollBurst      int           `split_words:"true" default:"50" desc:"enrollment attempts one client address may make at once"`
	ReleaseRate      string        `split_words:"true" default:"6/m" desc:"downloads of /install.sh and /_tether/release/ per client address, sustained: N/s, N/m, N/h, or off"`
	ReleaseBurst     int           `split_words:"true" default:"30" desc:"release downloads one client address may make at once (a site installing devices)"`
	DrainWindow      time.Duration `split_words:"true" default:"5s" desc:"on SIGTERM, agents are told to move over this window"`
	HeartbeatMin     time.Duration `split_words:"true" default:"5s" desc:"agents' heartbeat intervals are clamped to HEARTBEAT_MIN..HEARTBEAT_MAX (and the agent told): a dead agent loses its routes within 3×HEARTBEAT_MAX"`
	HeartbeatMax     time.Duration `split_words:"true" default:"60s" desc:"see HEARTBEAT_MIN"`
	MaxHandshakes    int           `split_words:"true" default:"1024" desc:"agent handshakes in progress at once (before the key is verified); more wait up to HANDSHAKE_TIMEOUT, then get 503"`
	HandshakeTimeout time.Duration `split_words:"true" default:"10s" desc:"an agent's handshake (from the upgrade to its leases) must finish within this, and no connection waits longer for a handshake slot: 1s..2m (shorter frees slots held by silent upgrades sooner; agents give up after 20s themselves)"`

	MaxHandshakesPerClient int `split_words:"true" desc:"of those, how many one client address (IPv6: one /64) may hold; its others wait up to HANDSHAKE_TIMEOUT for one of its own, then get 429; empty: 64, or a quarter of MAX_HANDSHAKES if less"`

	PublicHeaderTimeout     time.Duration `split_words:"true" default:"10s" desc:"public clients: time to send a request header"`
	PublicIdleTimeout       time.Duration `split_words:"true" default:"60s" desc:"public keep-alive connections idle this long are closed"`
	PublicBodyMinRate       int           `split_words:"true" default:"1024" desc:"public request bodies arriving slower than this (bytes/s on average, after 10s) are cut off"`
	PublicResponseTimeout   time.Duration `split_words:"true" default:"60s" desc:"wait for a device's response header, then answer 504"`
	PublicStreamIdleTimeout time.Duration `split_words:"true" default:"100s" desc:"connections to a device's HTTP service (WebSocket, streamed responses) with no byte either way for this long are closed"`
	PublicResponseMinRate   int           `split_words:"true" default:"4096" desc:"public clients must take what the device sends at this many bytes/s (each write within 5s plus its length at this rate), else they are cut off so their stream does not hold the device's session up"`
	PublicMaxPerClient      int           `split_words:"true" default:"64" desc:"connections one client address may hold to one device at once; beyond: 429, or the TCP connection is closed"`
	TCPIdleTimeout          time.Duration `split_words:"true" desc:"the longest a TCP lease connection may go with no byte either way, whatever its service asks (?idle= in the agent's TETHER_SERVICES; the shorter wins), and the timeout of services that ask none; empty: only services that ask are closed when idle"`

	LogFormat string `split_words:"true" default:"auto" desc:"auto (text on a terminal, else json), text or json"`
	LogLevel  string `split_words:"true" default:"info" desc:"debug, info, warn or error"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		if errors.Is(err, cli.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "tether-relay:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	var s spec
	unknown, err := cli.Parse("tether-relay", version, about, &s, args, stdout)
	if err != nil {
		return err
	}
	log, err := cli.Logger(os.Stderr, s.LogFormat, s.LogLevel)
	if err != nil {
		return err
	}
	cli.WarnUnknown(log, unknown)
	ports, err := controlplane.ParsePortRange(s.TCPPorts)
	if err != nil {
		return err
	}
	if s.HandshakeTimeout < time.Second || s.HandshakeTimeout > 2*time.Minute {
		return fmt.Errorf("TETHER_HANDSHAKE_TIMEOUT=%v: want 1s..2m", s.HandshakeTimeout)
	}
	if s.RelayID, err = relayID(s.RelayID, os.Hostname); err != nil {
		return err
	}
	names := splitList(s.PublicNames)
	connectLimit, enrollLimit, releaseLimit, err := rateLimits(s)
	if err != nil {
		return err
	}
	if s.AdminToken, err = cli.Secret(s.AdminToken, s.AdminTokenFile); err != nil {
		return err
	}
	keys, err := releaseKeys(s.ReleaseKeys)
	if err != nil {
		return fmt.Errorf("TETHER_RELEASE_KEYS: %w", err)
	}
	if s.NATSPassword, err = cli.Secret(s.NATSPassword, s.NATSPasswordFile); err != nil {
		return err
	}
	if err := os.MkdirAll(s.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}

	// Servers to start, in order; stopped in reverse.
	var servers []*namedServer
	var closers []func()
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}()

	// The replica first: its file lock is what stops a second relay on the
	// same data dir, before it starts anything.
	rep, err := replica.Open(replica.Config{Path: filepath.Join(s.DataDir, "relay.db"), Logger: log.With("component", "replica")})
	if err != nil {
		return err
	}
	closers = append(closers, func() { rep.Close() })

	// NATS and, standalone, the control plane.
	var relayNC *nats.Conn
	var cp *daemon.Daemon
	if s.NATSURL == "" {
		ns, err := natsembed.Start()
		if err != nil {
			return err
		}
		closers = append(closers, ns.Shutdown)
		cpNC, err := ns.ConnectAs(natsperm.ControlPlane, "controlplane")
		if err != nil {
			return err
		}
		closers = append(closers, func() { cpNC.Drain() })
		// The control plane outlives the signal: the relay reports its
		// sessions ended to it while shutting down; cp.Close stops it last.
		// The embedded NATS server is this process's own: no other control
		// plane can be on it, so there is nothing to listen for.
		cp, err = daemon.Start(context.Background(), cpNC, daemon.Config{DataDir: s.DataDir, TCPPorts: ports, AdminToken: s.AdminToken,
			MaxServices: s.MaxServices, Quarantine: s.LeaseQuarantine,
			Domain: s.Domain, Version: version, ClaimWait: time.Millisecond, ReleaseKeys: keys, Logger: log.With("component", "controlplane")})
		if err != nil {
			return err
		}
		closers = append(closers, func() { cp.Close() })
		if relayNC, err = ns.ConnectAs(natsperm.Relay, "relay "+s.RelayID); err != nil {
			return err
		}
	} else {
		auth := natsapi.Auth{User: s.NATSUser, Password: s.NATSPassword, CredsFile: s.NATSCreds, CAFile: s.NATSCA}
		if relayNC, err = natsapi.Connect(s.NATSURL, auth, natsperm.Relay, "relay "+s.RelayID, log.With("component", "nats")); err != nil {
			return err
		}
	}
	closers = append(closers, func() { relayNC.Drain() })

	cpClient := &natsapi.Client{NC: relayNC}
	tlsConf, certs, err := certificates(ctx, s, cpClient, names, log.With("component", "relay"))
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	relayCfg := relay.Config{
		RelayID: s.RelayID, Domain: s.Domain, PublicNames: names, ControlPlane: cpClient, Replica: rep,
		TCPHost: s.TCPHost, DrainWindow: s.DrainWindow, Logger: log.With("component", "relay"), Registerer: reg,
		MaxHandshakes: s.MaxHandshakes, MaxHandshakesPerClient: s.MaxHandshakesPerClient, HandshakeTimeout: s.HandshakeTimeout, HeartbeatMin: s.HeartbeatMin, HeartbeatMax: s.HeartbeatMax, TCPPorts: ports,
		Public: relay.PublicLimits{
			HeaderTimeout: s.PublicHeaderTimeout, IdleTimeout: s.PublicIdleTimeout, BodyMinRate: s.PublicBodyMinRate,
			ResponseHeaderTimeout: s.PublicResponseTimeout, StreamIdleTimeout: s.PublicStreamIdleTimeout,
			TCPIdleTimeout: s.TCPIdleTimeout, MaxStreamsPerClient: s.PublicMaxPerClient, ResponseMinRate: s.PublicResponseMinRate,
		},
	}
	if relayCfg.Releases, err = releases(keys, cpClient, s.DataDir, log.With("component", "releases")); err != nil {
		return err
	}
	relayCfg.ConnectLimit, relayCfg.EnrollLimit, relayCfg.ReleaseLimit = connectLimit, enrollLimit, releaseLimit
	// In a cluster, peers reach this relay on its cluster listener (a
	// standalone relay has no peers).
	var clusterLn net.Listener
	if s.NATSURL != "" {
		if clusterLn, err = listenCluster(s.ClusterAddr); err != nil {
			return err
		}
		closers = append(closers, func() { clusterLn.Close() })
		relayCfg.ClusterAddr, relayCfg.PeerCert, relayCfg.PeerRoots = s.ClusterAddr, &certs.Peer, certs.Roots()
	}
	rl, err := relay.New(relayCfg)
	if err != nil {
		return err
	}
	// Events published while NATS was away are lost: catch up.
	relayNC.SetReconnectHandler(func(nc *nats.Conn) {
		log.Info("NATS reconnected", "server", nc.ConnectedUrlRedacted())
		rl.Resync()
	})
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = rl.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}

	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	servers = append(servers,
		&namedServer{name: "https", addr: s.HTTPSAddr, srv: rl.HTTPSServer(tlsConf, errLog)},
		&namedServer{name: "http", addr: s.HTTPAddr, srv: rl.HTTPServer(errLog)},
		&namedServer{name: "ops", addr: s.OpsAddr, srv: &http.Server{Handler: opsHandler(reg, rl, relayNC, s.Pprof), ErrorLog: errLog}},
	)
	if cp != nil {
		servers = append(servers, &namedServer{name: "admin", addr: s.AdminAddr, srv: &http.Server{Handler: cp.Admin, ErrorLog: errLog}})
	}
	// Bind every listener before serving any, so that errors come at once.
	for _, ns := range servers {
		if ns.ln, err = net.Listen("tcp", ns.addr); err != nil {
			return fmt.Errorf("listen %s on %s: %w", ns.name, ns.addr, err)
		}
		closers = append(closers, func() { ns.ln.Close() })
	}
	serveErr := make(chan error, len(servers)+1)
	var serving sync.WaitGroup
	for _, ns := range servers {
		serving.Go(func() {
			var err error
			if ns.srv.TLSConfig != nil {
				err = ns.srv.ServeTLS(ns.ln, "", "")
			} else {
				err = ns.srv.Serve(ns.ln)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				serveErr <- fmt.Errorf("%s server: %w", ns.name, err)
			}
		})
	}
	if clusterLn != nil {
		// Until the relay stops: peers' streams are served while it drains.
		serving.Go(func() {
			if err := rl.ServePeers(context.Background(), clusterLn); err != nil {
				serveErr <- fmt.Errorf("cluster listener: %w", err)
			}
		})
		servers = append(servers, &namedServer{name: "cluster", ln: clusterLn})
	}
	attrs := []any{"relay_id", s.RelayID, "domain", s.Domain, "version", version}
	for _, ns := range servers {
		attrs = append(attrs, ns.name, ns.ln.Addr().String())
	}
	attrs = append(attrs, "ca", certs.RootPath, "certificates_kept", certs.Kept)
	log.Info("relay started", attrs...)
	if cp != nil {
		if cp.TokenGenerated {
			fmt.Fprintf(stdout, "Admin token (shown once; also in %s):\n  %s\n", cp.TokenFile, cp.AdminToken)
		} else if cp.TokenFile != "" {
			log.Info("admin token is in the data dir", "file", cp.TokenFile)
		}
	}

	var failed error
	select {
	case <-ctx.Done():
	case failed = <-serveErr:
		log.Error("server failed; shutting down", "err", failed)
	}
	log.Info("shutting down: draining agents", "window", s.DrainWindow)
	sctx, cancel := context.WithTimeout(context.Background(), s.DrainWindow+20*time.Second)
	defer cancel()
	if err := rl.Shutdown(sctx); err != nil {
		log.Warn("relay drain incomplete", "err", err)
	}
	for _, ns := range servers {
		if ns.srv != nil {
			ns.srv.Shutdown(sctx)
		}
	}
	rl.Close() // what a drain cut short left open, the cluster listener too
	serving.Wait()
	log.Info("relay stopped")
	return failed
}

// opsHandler serves the ops endpoints, with the relay's own /readyz: not
// ready without NATS, degraded without the control plane.
func opsHandler(g prometheus.Gatherer, rl *relay.Server, nc *nats.Conn, pprof bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", ops.Handler(g, nil, pprof))
	mux.Handle("GET /readyz", rl.ReadyHandler(nc.IsConnected))
	return mux
}

// relayID returns the configured relay ID after checking it, or else the
// host name up to its first dot, lower-cased: a relay ID is one DNS label
// (it names NATS subjects and the relay's peer certificate).
func relayID(configured string, hostname func() (string, error)) (string, error) {
	if configured != "" {
		if err := controlplane.ValidRelayID(configured); err != nil {
			return "", fmt.Errorf("TETHER_RELAY_ID: %w", err)
		}
		return configured, nil
	}
	host, err := hostname()
	if err != nil {
		return "", fmt.Errorf("TETHER_RELAY_ID is empty and the host name is unknown (%w): set TETHER_RELAY_ID", err)
	}
	id, _, _ := strings.Cut(strings.ToLower(host), ".")
	if err := controlplane.ValidRelayID(id); err != nil {
		return "", fmt.Errorf("TETHER_RELAY_ID is empty and the host name %q makes no relay ID (%w): set TETHER_RELAY_ID", host, err)
	}
	return id, nil
}

// listenCluster listens on the cluster address, which peers are told:
// it must name this relay, not a wildcard.
func listenCluster(addr string) (net.Listener, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("TETHER_CLUSTER_ADDR %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return nil, fmt.Errorf("TETHER_CLUSTER_ADDR %q is a wildcard: peers are told this address, so give the one they reach this relay on (e.g. 10.0.0.11:7444)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen cluster on %s: %w", addr, err)
	}
	return ln, nil
}

// splitList splits a comma-separated setting, dropping blanks.
func splitList(s string) []string {
	var out []string
	for part := range strings.SplitSeq(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

type namedServer struct {
	name, addr string
	srv        *http.Server
	ln         net.Listener
}

// certificates returns the public listener's TLS config and the relay's
// certificates from the cluster CA: the peer certificate always, and
// without certificate files an intermediate CA that issues the public
// ones (see relay.LoadCerts).
func certificates(ctx context.Context, s spec, cp relay.Certifier, names []string, log *slog.Logger) (*tls.Config, *relay.Certs, error) {
	files := s.TLSCert != "" || s.TLSKey != ""
	certs, err := relay.LoadCerts(ctx, relay.CertConfig{
		RelayID: s.RelayID, DataDir: s.DataDir, ControlPlane: cp, Public: !files,
		Domain: s.Domain, Hosts: append(slices.Clone(names), relay.ListenHosts(s.HTTPSAddr)...), Logger: log,
	})
	if err != nil {
		return nil, nil, err
	}
	if !files {
		return certs.TLS, certs, nil
	}
	cert, err := tls.LoadX509KeyPair(s.TLSCert, s.TLSKey)
	if err != nil {
		return nil, nil, fmt.Errorf("load TLS certificate: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, certs, nil
}
