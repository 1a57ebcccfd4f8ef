package httpapi

import (
	"context"
	"net/http"
	"net/url"
	"strings"

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
