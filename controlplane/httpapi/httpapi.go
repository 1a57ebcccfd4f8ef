// Package httpapi is the control plane's admin HTTP API (behind a bearer
// token) and the client that tetherctl uses to call it.
//
//	POST /v1/tokens                 {"uses":5,"ttl":"24h","labels":{"site":"lab"}} → {"token":"tth_…", …}
//	GET  /v1/tokens                 → [Token]
//	GET  /v1/devices                → [Device]
//	GET  /v1/devices/{device}       → Device
//	POST /v1/devices/{device}/revoke → RevokeResult (which live relays confirmed)
//	GET  /v1/leases                 → [Lease] (with the relays that could not bind a TCP lease's port)
//	GET  /v1/relays                 → [RelayInfo] (the live relays)
//
// Releases and rollouts (releases.go):
//
//	POST /v1/releases               {"manifest": base64, "signature": base64} → ReleaseInfo
//	PUT  /v1/releases/{version}/artifacts/{arch}  the binary → ReleaseInfo
//	GET  /v1/releases               → [ReleaseInfo], newest first
//	POST /v1/rollout                {"version","labels","percent"} → Rollout (starts one)
//	GET  /v1/rollout                → RolloutStatus
//	POST /v1/rollout/percent        {"percent": N} → Rollout
//	POST /v1/rollout/{pause,resume,abort} → Rollout
//
// Errors are {"error": "…"} with the status of the error's kind.
package httpapi

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

// Store is what the admin API needs of the control plane's state.
type Store interface {
	CreateToken(ctx context.Context, uses int, ttl time.Duration, labels map[string]string) (string, controlplane.Token, error)
	Tokens(ctx context.Context) ([]controlplane.Token, error)
	Devices(ctx context.Context) ([]controlplane.Device, error)
	Device(ctx context.Context, nameOrID string) (controlplane.Device, error)
	Leases(ctx context.Context) ([]controlplane.Lease, error)
}

// Cluster is what the admin API needs of the control plane's NATS side:
// natsapi.Service implements it.
type Cluster interface {
	// Revoke revokes a device and asks every live relay to confirm.
	Revoke(ctx context.Context, nameOrID string) (controlplane.RevokeResult, error)
	// Relays lists the live relays.
	Relays() []controlplane.RelayInfo
	// ReleaseLease frees a lease (hostname label or port) into
	// quarantine and tells the relays.
	ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error)
	// DeleteDevice revokes (if needed) and deletes a device, its leases
	// into quarantine unless keepNames.
	DeleteDevice(ctx context.Context, nameOrID string, keepNames bool) (controlplane.RevokeResult, []controlplane.Lease, error)
	// ReplaceDevice revokes (if needed) a device and makes the one-use
	// token with which a new device takes over its name and leases.
	ReplaceDevice(ctx context.Context, nameOrID string, ttl time.Duration) (controlplane.RevokeResult, string, controlplane.Token, error)
}

// Config configures the admin API.
type Config struct {
	// Store holds the state. Required.
	Store Store
	// Token is the bearer token every request must carry. Required: an empty
	// token refuses every request.
	Token string
	// Domain is appended to hostname labels in lease listings. Empty shows labels.
	Domain string
	// Cluster revokes devices cluster-wide and knows the live relays.
	// Required.
	Cluster Cluster
	// Releases publishes releases and runs rollouts. Nil: those routes
	// answer 503.
	Releases Releases
	// Logger receives failures; nil discards them.
	Logger *slog.Logger
}

// CreateTokenRequest is the body of POST /v1/tokens.
type CreateTokenRequest struct {
	Uses   int               `json:"uses"`   // zero means 1
	TTL    string            `json:"ttl"`    // Go duration; empty means 24h
	Labels map[string]string `json:"labels"` // given to devices it enrolls
}

// CreateTokenResponse is the answer: the secret is shown only here.
type CreateTokenResponse struct {
	Secret string `json:"token"`
	controlplane.Token
}

// Handler returns the admin API.
func Handler(cfg Config) http.Handler {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &api{cfg: cfg, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/tokens", a.createToken)
	mux.HandleFunc("GET /v1/tokens", func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(cfg.Store.Tokens(r.Context())) })
	mux.HandleFunc("GET /v1/devices", func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(cfg.Store.Devices(r.Context())) })
	mux.HandleFunc("GET /v1/devices/{device}", func(w http.ResponseWriter, r *http.Request) {
		a.reply(w, r)(cfg.Store.Device(r.Context(), r.PathValue("device")))
	})
	mux.HandleFunc("POST /v1/devices/{device}/revoke", a.revoke)
	mux.HandleFunc("GET /v1/leases", a.leases)
	mux.HandleFunc("GET /v1/relays", func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(cfg.Cluster.Relays(), nil) })
	a.releaseRoutes(mux)
	a.leaseRoutes(mux)
	a.deviceRoutes(mux)
	return a.auth(mux)
}

type api struct {
	cfg Config
	log *slog.Logger
}

func (a *api) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || a.cfg.Token == "" || subtle.ConstantTimeCompare([]byte(got), []byte(a.cfg.Token)) != 1 {
			writeError(w, controlplane.Errorf(controlplane.KindUnauthorized, "missing or wrong admin token"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// reply writes v as JSON, or err with its status.
func (a *api) reply(w http.ResponseWriter, r *http.Request) func(v any, err error) {
	return func(v any, err error) {
		if err != nil {
			if controlplane.KindOf(err) == controlplane.KindInternal {
				a.log.Error("admin request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			}
			writeError(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(v)
	}
}

func writeError(w http.ResponseWriter, err error) {
	kind := controlplane.KindOf(err)
	msg := err.Error()
	if kind == controlplane.KindInternal {
		msg = "internal error"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(kind.HTTPStatus())
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func (a *api) createToken(w http.ResponseWriter, r *http.Request) {
	var req CreateTokenRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil {
		writeError(w, controlplane.Errorf(controlplane.KindInvalid, "decode request: %v", err))
		return
	}
	if req.Uses == 0 {
		req.Uses = 1
	}
	ttl := 24 * time.Hour
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil {
			writeError(w, controlplane.Errorf(controlplane.KindInvalid, "ttl %q: %v", req.TTL, err))
			return
		}
		ttl = d
	}
	secret, tok, err := a.cfg.Store.CreateToken(r.Context(), req.Uses, ttl, req.Labels)
	if err == nil {
		a.log.Info("enrollment token created", "token_id", tok.ID, "uses", tok.Uses, "expires", tok.ExpiresAt)
	}
	a.reply(w, r)(CreateTokenResponse{Secret: secret, Token: tok}, err)
}

func (a *api) revoke(w http.ResponseWriter, r *http.Request) {
	res, err := a.cfg.Cluster.Revoke(r.Context(), r.PathValue("device"))
	if err == nil {
		a.log.Info("revocation", "device", res.Device.Name, "device_id", res.Device.ID,
			"confirmed", res.Confirmed, "pending", res.Pending, "undelivered", res.Undelivered)
	}
	a.reply(w, r)(res, err)
}

// leases lists the leases, each TCP lease with the live relays that
// reported its port as unbound.
func (a *api) leases(w http.ResponseWriter, r *http.Request) {
	ls, err := a.cfg.Store.Leases(r.Context())
	unbound := map[uint16][]string{}
	for _, rl := range a.cfg.Cluster.Relays() {
		for _, p := range rl.UnboundPorts {
			unbound[p] = append(unbound[p], rl.ID)
		}
	}
	for i := range ls {
		if ls[i].Hostname != "" && a.cfg.Domain != "" {
			ls[i].Hostname += "." + a.cfg.Domain
		}
		if ls[i].Port != 0 {
			ls[i].UnboundOn = slices.Sorted(slices.Values(unbound[ls[i].Port]))
		}
	}
	a.reply(w, r)(ls, err)
}

// Client calls the admin API.
type Client struct {
	BaseURL string // e.g. http://127.0.0.1:7070
	Token   string
	HTTP    *http.Client // nil means http.DefaultClient
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var b []byte
	if body != nil {
		var err error
		if b, err = json.Marshal(body); err != nil {
			return err
		}
	}
	rd := bytes.NewReader(b)
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.BaseURL, "/")+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return c.send(req, out)
}

// send sends req with the admin token and decodes the JSON answer into out.
func (c *Client) send(req *http.Request, out any) error {
	method, path := req.Method, req.URL.Path
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		json.NewDecoder(resp.Body).Decode(&e)
		if e.Error == "" {
			e.Error = resp.Status
		}
		return fmt.Errorf("%s %s: %s (HTTP %d)", method, path, e.Error, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// CreateToken creates an enrollment token.
func (c *Client) CreateToken(ctx context.Context, req CreateTokenRequest) (CreateTokenResponse, error) {
	var out CreateTokenResponse
	return out, c.do(ctx, http.MethodPost, "/v1/tokens", req, &out)
}

// Devices lists devices.
func (c *Client) Devices(ctx context.Context) ([]controlplane.Device, error) {
	var out []controlplane.Device
	return out, c.do(ctx, http.MethodGet, "/v1/devices", nil, &out)
}

// Leases lists leases.
func (c *Client) Leases(ctx context.Context) ([]controlplane.Lease, error) {
	var out []controlplane.Lease
	return out, c.do(ctx, http.MethodGet, "/v1/leases", nil, &out)
}

// Revoke revokes a device by name or ID and says which live relays
// confirmed they cut it off.
func (c *Client) Revoke(ctx context.Context, device string) (controlplane.RevokeResult, error) {
	var out controlplane.RevokeResult
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(device)+"/revoke", nil, &out)
}

// Relays lists the live relays.
func (c *Client) Relays(ctx context.Context) ([]controlplane.RelayInfo, error) {
	var out []controlplane.RelayInfo
	return out, c.do(ctx, http.MethodGet, "/v1/relays", nil, &out)
}
