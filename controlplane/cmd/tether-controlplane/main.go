// Command tether-controlplane runs the control plane of a Tether cluster:
// it serves relays over NATS and operators over the admin API, with its
// state in a bbolt file. A standalone tether-relay embeds one instead.
//
// Only one control plane serves a NATS cluster: a second one (a standby
// started too early) exits with status 1, naming the one that serves.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/daemon"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/controlplane/ops"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames/cli"
)

var version = "dev"

const about = `tether-controlplane: enrollment, revocation, leases and presence for a Tether cluster,
served to relays over NATS and to operators (tetherctl) over the admin API.`

type spec struct {
	NATSURL          string        `envconfig:"NATS_URL" required:"true" desc:"NATS server(s) the relays use, comma-separated"`
	NATSUser         string        `split_words:"true" desc:"NATS user (controlplane in relay/deploy/nats.conf)"`
	NATSPassword     string        `split_words:"true" desc:"NATS password"`
	NATSPasswordFile string        `split_words:"true" desc:"file holding the NATS password"`
	NATSCreds        string        `split_words:"true" desc:"NATS .creds file (instead of user and password)"`
	NATSCA           string        `envconfig:"NATS_CA" desc:"PEM file of the CA of the NATS servers' TLS certificates"`
	ClaimWait        time.Duration `split_words:"true" default:"2s" desc:"how long to listen for another control plane on the same NATS before serving"`
	CertDomains      string        `split_words:"true" desc:"comma-separated domains relays' intermediate certificates may cover; empty: TETHER_DOMAIN"`
	DataDir          string        `split_words:"true" default:"./tether-data" desc:"controlplane.db, the cluster CA (ca.pem: agents trust it) and generated secrets"`
	Domain           string        `split_words:"true" default:"localhost" desc:"base domain, shown in lease listings"`
	TCPPorts         string        `split_words:"true" default:"20000-29999" desc:"port range for TCP leases"`
	MaxServices      int           `split_words:"true" default:"32" desc:"leases (hostnames and TCP ports) one device may hold"`
	LeaseQuarantine  time.Duration `split_words:"true" default:"168h" desc:"a released hostname or port is leased to nobody for this long"`
	AdminAddr        string        `split_words:"true" default:"127.0.0.1:7070" desc:"admin API listener"`
	AdminToken       string        `split_words:"true" desc:"admin bearer token; empty: generated into <data dir>/admin-token"`
	AdminTokenFile   string        `split_words:"true" desc:"file holding the admin token"`
	ReleaseKeys      string        `split_words:"true" desc:"comma-separated minisign public keys (RW...) a published release must be signed with; empty: no release is accepted"`
	OpsAddr          string        `split_words:"true" default:"127.0.0.1:7072" desc:"/metrics, /healthz, /readyz: unauthenticated, so loopback unless exposed on purpose (README: Operations)"`
	Pprof            bool          `envconfig:"PPROF" desc:"also serve /debug/pprof on the ops listener (1 or true); off: profiles show memory contents"`
	LogFormat        string        `split_words:"true" default:"auto" desc:"auto (text on a terminal, else json), text or json"`
	LogLevel         string        `split_words:"true" default:"info" desc:"debug, info, warn or error"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil && !errors.Is(err, cli.ErrHelp) {
		fmt.Fprintln(os.Stderr, "tether-controlplane:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	var s spec
	unknown, err := cli.Parse("tether-controlplane", version, about, &s, args, stdout)
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
	if s.AdminToken, err = cli.Secret(s.AdminToken, s.AdminTokenFile); err != nil {
		return err
	}
	if s.NATSPassword, err = cli.Secret(s.NATSPassword, s.NATSPasswordFile); err != nil {
		return err
	}
	releaseKeys, err := release.ParseKeys(strings.Split(s.ReleaseKeys, ","))
	if err != nil {
		return fmt.Errorf("TETHER_RELEASE_KEYS: %w", err)
	}
	auth := natsapi.Auth{User: s.NATSUser, Password: s.NATSPassword, CredsFile: s.NATSCreds, CAFile: s.NATSCA}
	nc, err := natsapi.Connect(s.NATSURL, auth, natsperm.ControlPlane, "tether-controlplane", log.With("component", "nats"))
	if err != nil {
		return err
	}
	defer nc.Drain()
	certDomains := []string{s.Domain}
	if s.CertDomains != "" {
		certDomains = strings.Split(s.CertDomains, ",")
	}
	cp, err := daemon.Start(ctx, nc, daemon.Config{
		DataDir: s.DataDir, TCPPorts: ports, AdminToken: s.AdminToken, Domain: s.Domain, Version: version,
		MaxServices: s.MaxServices, Quarantine: s.LeaseQuarantine,
		CertDomains: certDomains, ClaimWait: s.ClaimWait, ReleaseKeys: releaseKeys, Logger: log,
	})
	if err != nil {
		return err
	}
	defer cp.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	errLog := slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	admin := &http.Server{Handler: cp.Admin, ErrorLog: errLog}
	opsSrv := &http.Server{Handler: ops.Handler(reg, func(ctx context.Context) error { return nc.FlushWithContext(ctx) }, s.Pprof), ErrorLog: errLog}
	adminLn, err := net.Listen("tcp", s.AdminAddr)
	if err != nil {
		return fmt.Errorf("listen admin on %s: %w", s.AdminAddr, err)
	}
	opsLn, err := net.Listen("tcp", s.OpsAddr)
	if err != nil {
		adminLn.Close()
		return fmt.Errorf("listen ops on %s: %w", s.OpsAddr, err)
	}
	go admin.Serve(adminLn)
	go opsSrv.Serve(opsLn)
	log.Info("control plane started", "admin", adminLn.Addr().String(), "ops", opsLn.Addr().String(), "data_dir", s.DataDir, "version", version)
	if cp.TokenGenerated {
		fmt.Fprintf(stdout, "Admin token (shown once; also in %s):\n  %s\n", cp.TokenFile, cp.AdminToken)
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin.Shutdown(sctx)
	opsSrv.Shutdown(sctx)
	log.Info("control plane stopped")
	return nil
}
