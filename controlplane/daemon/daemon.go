// Package daemon wires a complete control plane: the bbolt store, its NATS
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

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/boltstore"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/controlplane/natsapi"
)

// Config configures a control plane.
type Config struct {
	// DataDir holds controlplane.db and, when AdminToken is empty, the
	// generated admin-token file. Required.
	DataDir string
	// TCPPorts is the range TCP leases come from. Zero means 20000-29999.
	TCPPorts controlplane.PortRange
	// AdminToken guards the admin API. Empty means: read
	// <DataDir>/admin-token, generating it on first start.
	AdminToken string
	// Domain is shown in lease listings. Empty shows bare labels.
	Domain string
	// Version is reported in service discovery.
	Version string
	// Logger; nil discards.
	Logger *slog.Logger
}

// Daemon is a running control plane.
type Daemon struct {
	Store *boltstore.Store
	// Admin is the admin API handler, to be served on the admin listener.
	Admin http.Handler
	// AdminToken is the token the admin API accepts.
	AdminToken string
	// TokenFile is where a generated AdminToken is kept ("" if it was given).
	TokenFile string
	// TokenGenerated is true when AdminToken was created by this start.
	TokenGenerated bool

	svc *natsapi.Service
}

// Start opens the store and serves the control plane on nc until Close.
func Start(ctx context.Context, nc *nats.Conn, cfg Config) (*Daemon, error) {
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
	store, err := boltstore.Open(boltstore.Config{Path: filepath.Join(cfg.DataDir, "controlplane.db"), TCPPorts: cfg.TCPPorts})
	if err != nil {
		return nil, err
	}
	d.Store = store
	d.svc, err = natsapi.Serve(ctx, nc, natsapi.ServiceConfig{Store: store, Version: cfg.Version, Logger: log})
	if err != nil {
		store.Close()
		return nil, err
	}
	d.Admin = httpapi.Handler(httpapi.Config{
		Store: store, Token: d.AdminToken, Domain: cfg.Domain, Logger: log,
		Revoked: func(dev controlplane.Device) error {
			return natsapi.Publish(nc, controlplane.DeviceEvent{Kind: controlplane.EventRevoked, DeviceID: dev.ID})
		},
	})
	return d, nil
}

// Close stops serving and closes the store.
func (d *Daemon) Close() error {
	err := d.svc.Stop()
	return errors.Join(err, d.Store.Close())
}

// loadOrCreateSecret reads a secret file, or creates it (0600) with a new
// random secret.
func loadOrCreateSecret(path string) (string, bool, error) {
	b, err := os.ReadFile(path)
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
	if err := os.WriteFile(path, []byte(s+"\n"), 0o600); err != nil {
		return "", false, fmt.Errorf("write admin token: %w", err)
	}
	return s, true, nil
}
