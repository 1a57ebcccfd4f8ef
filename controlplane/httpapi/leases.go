package httpapi

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

// leaseRoutes adds POST /v1/leases/{name}/release: name is a hostname
// (with or without the domain) or a TCP port.
func (a *api) leaseRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/leases/{name}/release", func(w http.ResponseWriter, r *http.Request) {
		name := strings.ToLower(r.PathValue("name"))
		if a.cfg.Domain != "" {
			name = strings.TrimSuffix(name, "."+a.cfg.Domain)
		}
		l, err := a.cfg.Cluster.ReleaseLease(r.Context(), name)
		if err == nil && l.Hostname != "" && a.cfg.Domain != "" {
			l.Hostname += "." + a.cfg.Domain
		}
		a.reply(w, r)(l, err)
	})
}

// ReleaseLease frees a lease, by hostname or port, into quarantine.
func (c *Client) ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error) {
	var out controlplane.Lease
	return out, c.do(ctx, http.MethodPost, "/v1/leases/"+url.PathEscape(name)+"/release", nil, &out)
}

// DeleteDeviceResponse answers POST /v1/devices/{device}/delete.
type DeleteDeviceResponse struct {
	controlplane.RevokeResult
	Leases []controlplane.Lease `json:"leases"` // the leases it held: in quarantine, or kept taken
}

// ReplaceDeviceResponse answers POST /v1/devices/{device}/replace: the
// token (shown only here) a new device enrolls with to take the revoked
// device's name and leases.
type ReplaceDeviceResponse struct {
	controlplane.RevokeResult
	Secret string             `json:"token"`
	Token  controlplane.Token `json:"token_info"`
}

// deviceRoutes adds POST /v1/devices/{device}/delete[?keep_names=1] and
// POST /v1/devices/{device}/replace[?ttl=24h].
func (a *api) deviceRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/devices/{device}/delete", func(w http.ResponseWriter, r *http.Request) {
		keep := r.URL.Query().Get("keep_names")
		res, leases, err := a.cfg.Cluster.DeleteDevice(r.Context(), r.PathValue("device"), keep == "1" || keep == "true")
		if err == nil {
			a.log.Info("device deleted", "device", res.Device.Name, "device_id", res.Device.ID, "leases", len(leases), "keep_names", keep)
		}
		a.reply(w, r)(DeleteDeviceResponse{RevokeResult: res, Leases: leases}, err)
	})
	mux.HandleFunc("POST /v1/devices/{device}/replace", func(w http.ResponseWriter, r *http.Request) {
		ttl := 24 * time.Hour
		if v := r.URL.Query().Get("ttl"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 || d > 30*24*time.Hour {
				a.reply(w, r)(nil, controlplane.Errorf(controlplane.KindInvalid, "ttl %q: a Go duration up to 720h", v))
				return
			}
			ttl = d
		}
		res, secret, tok, err := a.cfg.Cluster.ReplaceDevice(r.Context(), r.PathValue("device"), ttl)
		a.reply(w, r)(ReplaceDeviceResponse{RevokeResult: res, Secret: secret, Token: tok}, err)
	})
}

// DeleteDevice revokes (if needed) and deletes a device.
func (c *Client) DeleteDevice(ctx context.Context, device string, keepNames bool) (DeleteDeviceResponse, error) {
	var out DeleteDeviceResponse
	q := ""
	if keepNames {
		q = "?keep_names=1"
	}
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(device)+"/delete"+q, nil, &out)
}

// ReplaceDevice revokes (if needed) a device and returns the token its
// replacement enrolls with.
func (c *Client) ReplaceDevice(ctx context.Context, device string, ttl time.Duration) (ReplaceDeviceResponse, error) {
	var out ReplaceDeviceResponse
	return out, c.do(ctx, http.MethodPost, "/v1/devices/"+url.PathEscape(device)+"/replace?ttl="+url.QueryEscape(ttl.String()), nil, &out)
}
