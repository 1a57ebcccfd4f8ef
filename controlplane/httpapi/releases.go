package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/firmware/release"
)

// Releases is what the admin API needs to publish releases and run
// rollouts: rollout.Manager implements it.
type Releases interface {
	Publish(ctx context.Context, manifest, sig []byte) (controlplane.ReleaseInfo, error)
	PutArtifact(ctx context.Context, version, arch string, r io.Reader) (controlplane.ReleaseInfo, error)
	Releases(ctx context.Context) ([]controlplane.ReleaseInfo, error)
	Start(ctx context.Context, version string, labels map[string]string, percent int) (controlplane.Rollout, error)
	SetPercent(ctx context.Context, percent int) (controlplane.Rollout, error)
	Pause(ctx context.Context) (controlplane.Rollout, error)
	Resume(ctx context.Context) (controlplane.Rollout, error)
	Abort(ctx context.Context) (controlplane.Rollout, error)
	Status(ctx context.Context) (controlplane.RolloutStatus, error)
}

// PublishRequest is the body of POST /v1/releases: manifest.json and
// manifest.json.minisig as they are on disk.
type PublishRequest struct {
	Manifest  []byte `json:"manifest"`
	Signature []byte `json:"signature"`
}

// StartRolloutRequest is the body of POST /v1/rollout.
type StartRolloutRequest struct {
	Version string            `json:"version"`
	Labels  map[string]string `json:"labels,omitempty"`
	Percent int               `json:"percent"`
}

// PercentRequest is the body of POST /v1/rollout/percent.
type PercentRequest struct {
	Percent int `json:"percent"`
}

// maxPublishBody bounds POST /v1/releases: a manifest and a signature
// at their limits, base64 in JSON.
const maxPublishBody = 2 * (release.MaxManifestSize + release.MaxSignatureSize)

func (a *api) releaseRoutes(mux *http.ServeMux) {
	rs := a.cfg.Releases
	if rs == nil {
		off := func(w http.ResponseWriter, r *http.Request) {
			writeError(w, controlplane.Errorf(controlplane.KindUnavailable, "this control plane serves no releases"))
		}
		for _, p := range []string{"/v1/releases", "/v1/releases/", "/v1/rollout", "/v1/rollout/"} {
			mux.HandleFunc(p, off)
		}
		return
	}
	mux.HandleFunc("POST /v1/releases", func(w http.ResponseWriter, r *http.Request) {
		var req PublishRequest
		if !decode(w, r, maxPublishBody, &req) {
			return
		}
		a.reply(w, r)(rs.Publish(r.Context(), req.Manifest, req.Signature))
	})
	mux.HandleFunc("PUT /v1/releases/{version}/artifacts/{arch}", func(w http.ResponseWriter, r *http.Request) {
		// The manifest bounds the size exactly; this bounds the worst case.
		body := http.MaxBytesReader(w, r.Body, release.MaxArtifactSize+1)
		a.reply(w, r)(rs.PutArtifact(r.Context(), r.PathValue("version"), r.PathValue("arch"), body))
	})
	mux.HandleFunc("GET /v1/releases", func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(rs.Releases(r.Context())) })
	mux.HandleFunc("POST /v1/rollout", func(w http.ResponseWriter, r *http.Request) {
		var req StartRolloutRequest
		if !decode(w, r, 64<<10, &req) {
			return
		}
		a.reply(w, r)(rs.Start(r.Context(), req.Version, req.Labels, req.Percent))
	})
	mux.HandleFunc("GET /v1/rollout", func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(rs.Status(r.Context())) })
	mux.HandleFunc("POST /v1/rollout/percent", func(w http.ResponseWriter, r *http.Request) {
		var req PercentRequest
		if !decode(w, r, 4<<10, &req) {
			return
		}
		a.reply(w, r)(rs.SetPercent(r.Context(), req.Percent))
	})
	for name, fn := range map[string]func(context.Context) (controlplane.Rollout, error){
		"pause": rs.Pause, "resume": rs.Resume, "abort": rs.Abort,
	} {
		mux.HandleFunc("POST /v1/rollout/"+name, func(w http.ResponseWriter, r *http.Request) { a.reply(w, r)(fn(r.Context())) })
	}
}

// decode reads a JSON body of at most limit bytes, answering 400 itself
// when it cannot.
func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit)).Decode(v); err != nil {
		writeError(w, controlplane.Errorf(controlplane.KindInvalid, "decode request: %v", err))
		return false
	}
	return true
}

// PublishRelease sends a release's manifest and signature; its binaries
// follow with UploadArtifact.
func (c *Client) PublishRelease(ctx context.Context, manifest, sig []byte) (controlplane.ReleaseInfo, error) {
	var out controlplane.ReleaseInfo
	return out, c.do(ctx, http.MethodPost, "/v1/releases", PublishRequest{Manifest: manifest, Signature: sig}, &out)
}

// UploadArtifact sends the binary of one architecture of a published
// release (size bytes read from body).
func (c *Client) UploadArtifact(ctx context.Context, version, arch string, body io.Reader, size int64) (controlplane.ReleaseInfo, error) {
	path := "/v1/releases/" + url.PathEscape(version) + "/artifacts/" + url.PathEscape(arch)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, strings.TrimRight(c.BaseURL, "/")+path, body)
	if err != nil {
		return controlplane.ReleaseInfo{}, err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	var out controlplane.ReleaseInfo
	return out, c.send(req, &out)
}

// Releases lists the published releases, newest first.
func (c *Client) Releases(ctx context.Context) ([]controlplane.ReleaseInfo, error) {
	var out []controlplane.ReleaseInfo
	return out, c.do(ctx, http.MethodGet, "/v1/releases", nil, &out)
}

// StartRollout starts a rollout (replacing the current one).
func (c *Client) StartRollout(ctx context.Context, req StartRolloutRequest) (controlplane.Rollout, error) {
	var out controlplane.Rollout
	return out, c.do(ctx, http.MethodPost, "/v1/rollout", req, &out)
}

// SetRolloutPercent changes the current rollout's percent.
func (c *Client) SetRolloutPercent(ctx context.Context, percent int) (controlplane.Rollout, error) {
	var out controlplane.Rollout
	return out, c.do(ctx, http.MethodPost, "/v1/rollout/percent", PercentRequest{Percent: percent}, &out)
}

// RolloutAction pauses, resumes or aborts the current rollout (action is
// "pause", "resume" or "abort").
func (c *Client) RolloutAction(ctx context.Context, action string) (controlplane.Rollout, error) {
	switch action {
	case "pause", "resume", "abort":
	default:
		return controlplane.Rollout{}, fmt.Errorf("rollout %s: want pause, resume or abort", action)
	}
	var out controlplane.Rollout
	return out, c.do(ctx, http.MethodPost, "/v1/rollout/"+action, nil, &out)
}

// RolloutStatus returns the current rollout and where its devices are.
func (c *Client) RolloutStatus(ctx context.Context) (controlplane.RolloutStatus, error) {
	var out controlplane.RolloutStatus
	return out, c.do(ctx, http.MethodGet, "/v1/rollout", nil, &out)
}
