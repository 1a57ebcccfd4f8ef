// Package daemon wires a complete control plane: the claim that makes it
// the only one on its NATS, the bbolt store, the cluster CA, its NATS
// service for relays, and the admin HTTP API. The standalone relay and
// tether-controlplane both run one.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/boltstore"
	"github.com/tetherfleet/tether/controlplane/clusterca"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/rollout"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames/secretfile"
)

// Config configures a control plane.
type Config struct {
	// DataDir holds controlplane.db, the cluster CA (ca.pem, ca-key.pem)
	// and, when AdminToken is empty, the generated admin-token file.
	// Required.
	DataDir string
	// TCPPorts is the range TCP leases come from. Zero means 20000-29999.
	TCPPorts controlplane.PortRange
	// MaxServices caps the leases of one device; Quarantine is how long a
	// released name or port stays unleased. Zero means boltstore's
	// defaults (32, 7 days).
	MaxServices int
	Quarantine  time.Duration
	// AdminToken guards the admin API. Empty means: read
	// <DataDir>/admin-token, generating it on first start.
	AdminToken string
	// Domain is shown in lease listings. Empty shows bare labels.
	Domain string
	// Version is reported in service discovery.
	Version string
	// CertDomains, when not empty, are the only domains relays' intermediate
	// certificates may be constrained to. Empty means any name.
	CertDomains []string
	// ClaimWait is how long a starting control plane listens for another
	// one on the same NATS before it serves. Zero means 2s.
	ClaimWait time.Duration
	// Host names this control plane to others that would start. Empty
	// means the host name.
	Host string
	// HelloInterval is how often relays say hello. Zero means
	// controlplane.HelloInterval.
	HelloInterval time.Duration
	// RevokeTimeout bounds the wait for each relay's confirmation of a
	// revocation. Zero means 3s.
	RevokeTimeout time.Duration
	// ReleaseKeys are the release public keys a published release must
	// verify with (TETHER_RELEASE_KEYS). Empty: every publish is refused.
	ReleaseKeys release.Keys
	// Logger; nil discards.
	Logger *slog.Logger
}

// Daemon is a running control plane.
type Daemon struct {
	Store *boltstore.Store
	// CA is the cluster CA; CA.Path is the root agents trust.
	CA *clusterca.CA
	// Service is the NATS service relays talk to.
	Service *natsapi.Service
	// Releases keeps releases (binaries in <DataDir>/releases) and runs
	// the rollout.
	Releases *rollout.Manager
	// Claim is this control plane's claim, answered to any other.
	Claim controlplane.Claim
	// Admin is the admin API handler, to be served on the admin listener.
	Admin http.Handler
	// AdminToken is the token the admin API accepts.
	AdminToken string
	// TokenFile is where a generated AdminToken is kept ("" if it was given).
	TokenFile string
	// TokenGenerated is true when AdminToken was created by this start.
	TokenGenerated bool

	active *natsapi.Active
}

// Start claims the control plane role on nc's NATS (a *natsapi.ClaimError
// when another control plane serves or starts first), opens the store and
// the cluster CA, and serves the control plane on nc until Close. nc
// should be connected as natsperm.ControlPlane.
func Start(ctx context.Context, nc *nats.Conn, cfg Config) (_ *Daemon, err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	d := &Daemon{AdminToken: cfg.AdminToken}
	if d.AdminToken == "" {
		d.TokenFile = filepath.Join(cfg.DataDir, "admin-token")
		var err error
		if d.AdminToken, d.TokenGenerated, err = loadOrCreateSecret(d.TokenFile); err != nil {
			return nil, err
		}
	}
	d.CA, err = clusterca.LoadOrCreate(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	d.CA.Domains = cfg.CertDomains
	d.active, err = natsapi.Claim(ctx, nc, natsapi.ClaimConfig{Wait: cfg.ClaimWait, Host: cfg.Host, Logger: log})
	if err != nil {
		return nil, err
	}
	d.Claim = d.active.Claim
	defer func() {
		if err != nil {
			d.active.Release()
		}
	}()
	store, err := boltstore.Open(boltstore.Config{Path: filepath.Join(cfg.DataDir, "controlplane.db"), TCPPorts: cfg.TCPPorts,
		MaxServices: cfg.MaxServices, Quarantine: cfg.Quarantine})
	if err != nil {
		return nil, err
	}
	d.Store = store
	d.Releases, err = rollout.New(rollout.Config{
		Store: store, Dir: filepath.Join(cfg.DataDir, "releases"), Keys: cfg.ReleaseKeys, Logger: log.With("component", "releases"),
		OnChange: func(ev controlplane.ReleaseEvent) {
			if err := natsapi.PublishReleaseEvent(nc, ev); err != nil {
				log.Warn("relays were not told of a release change (they see it within a minute)", "err", err)
			}
		},
	})
	if err != nil {
		store.Close()
		return nil, err
	}
	d.Service, err = natsapi.Serve(ctx, nc, natsapi.ServiceConfig{
		Store: store, CA: d.CA, Releases: d.Releases, Version: cfg.Version, Logger: log,
		HelloInterval: cfg.HelloInterval, RevokeTimeout: cfg.RevokeTimeout,
	})
	if err != nil {
		store.Close()
		return nil, err
	}
	store.SetPortBusy(d.Service.PortBusy) // ports relays report held by others are not leased
	d.Admin = httpapi.Handler(httpapi.Config{Store: store, Cluster: d.Service, Releases: d.Releases, Token: d.AdminToken, Domain: cfg.Domain, Logger: log})
	log.Info("control plane serving", "instance", d.Claim.Instance, "epoch", d.Service.Epoch(), "ca", d.CA.Path)
	return d, nil
}

// Close stops serving, releases the claim and closes the store.
func (d *Daemon) Close() error {
	return errors.Join(d.Service.Stop(), d.active.Release(), d.Store.Close())
}

// loadOrCreateSecret reads a secret file, or creates it (0600) with a new
// random secret. A file others may read is refused (secretfile).
func loadOrCreateSecret(path string) (string, bool, error) {
	b, err := secretfile.Read(path)
	if err == nil {
		if s := strings.TrimSpace(string(b)); s != "" {
			return s, false, nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", false, fmt.Errorf("read admin token: %w", err)
	}
	raw := make([]byte, 24)
	rand.Read(raw)
	s := "tta_" + hex.EncodeToString(raw)
	if err := secretfile.Write(path, []byte(s+"\n")); err != nil {
		return "", false, fmt.Errorf("write admin token: %w", err)
	}
	return s, true, nil
}
