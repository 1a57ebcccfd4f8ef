package natsapi

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

// ReleaseService is what the control plane's release endpoints serve:
// rollout.Manager implements it.
type ReleaseService interface {
	// Plan returns what relays offer now.
	Plan(ctx context.Context) (controlplane.RolloutPlan, error)
	// Latest returns the newest complete release.
	Latest(ctx context.Context) (controlplane.Release, bool, error)
	// Get returns a complete release.
	Get(ctx context.Context, version string) (controlplane.Release, error)
	// ReadArtifact reads a release's binary at off.
	ReadArtifact(ctx context.Context, version, arch string, off int64, p []byte) (int, int64, error)
	// Report records an agent's update status.
	Report(ctx context.Context, r controlplane.UpdateReport) error
}

// releaseEndpoints are the release endpoints; without a ReleaseService
// each answers KindUnavailable.
func (s *Service) releaseEndpoints(h *handler) map[string]micro.Handler {
	rs := s.cfg.Releases
	if rs == nil {
		rs = noReleases{}
	}
	return map[string]micro.Handler{
		controlplane.SubjectReleasePlan: handle(h, func(ctx context.Context, _ struct{}) (controlplane.RolloutPlan, error) { return rs.Plan(ctx) }),
		controlplane.SubjectReleaseLatest: handle(h, func(ctx context.Context, _ struct{}) (controlplane.LatestResponse, error) {
			rel, ok, err := rs.Latest(ctx)
			return controlplane.LatestResponse{Release: rel, OK: ok}, err
		}),
		controlplane.SubjectReleaseGet: handle(h, rs.Get),
		controlplane.SubjectReleaseArtifact: handle(h, func(ctx context.Context, r controlplane.ArtifactRequest) (controlplane.ArtifactChunk, error) {
			n := r.Length
			if n <= 0 || n > controlplane.MaxArtifactChunk {
				n = controlplane.MaxArtifactChunk
			}
			buf := make([]byte, n)
			got, size, err := rs.ReadArtifact(ctx, r.Version, r.Arch, r.Offset, buf)
			return controlplane.ArtifactChunk{Data: buf[:got], Size: size}, err
		}),
		controlplane.SubjectReleaseReport: handle(h, func(ctx context.Context, r controlplane.UpdateReport) (struct{}, error) {
			return struct{}{}, rs.Report(ctx, r)
		}),
	}
}

type noReleases struct{}

var errNoReleases = controlplane.Errorf(controlplane.KindUnavailable, "this control plane serves no releases")

func (noReleases) Plan(context.Context) (controlplane.RolloutPlan, error) {
	return controlplane.RolloutPlan{}, nil
}
func (noReleases) Latest(context.Context) (controlplane.Release, bool, error) {
	return controlplane.Release{}, false, nil
}
func (noReleases) Get(context.Context, string) (controlplane.Release, error) {
	return controlplane.Release{}, errNoReleases
}
func (noReleases) ReadArtifact(context.Context, string, string, int64, []byte) (int, int64, error) {
	return 0, 0, errNoReleases
}
func (noReleases) Report(context.Context, controlplane.UpdateReport) error { return errNoReleases }

// PublishReleaseEvent tells relays that a release became complete or the
// rollout changed (they drop their cached plan). nc is the control
// plane's connection: relays may not publish it.
func PublishReleaseEvent(nc *nats.Conn, ev controlplane.ReleaseEvent) error {
	data, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode release event: %w", err)
	}
	if err := nc.Publish(controlplane.SubjectReleaseEvents, data); err != nil {
		return fmt.Errorf("publish release event: %w", err)
	}
	return nil
}

var _ controlplane.Releases = (*Client)(nil)

// releaseCache is the Client's cached RolloutPlan. Offers are answered
// from it (a relay asks at each session's start and about every minute
// per session); it is fetched again after Client.PlanTTL or a release
// event, and never by two callers at once.
type releaseCache struct {
	fetch sync.Mutex // held while fetching

	mu       sync.Mutex
	plan     controlplane.RolloutPlan
	manifest release.Manifest // the plan's, parsed
	devices  map[string]bool
	at       time.Time
	stale    bool
	events   uint64 // release events seen: one during a fetch leaves the plan stale
	watching bool
	// refused are devices that reported refusing or rolling back from the
	// plan's release through this client since the plan was fetched.
	refused map[string]bool

	// Latest's answer, when it was fetched and the events seen before.
	latest       *controlplane.LatestResponse
	latestAt     time.Time
	latestEvents uint64
}

func (c *Client) releaseCache() *releaseCache {
	c.rcOnce.Do(func() { c.rc = &releaseCache{stale: true} })
	return c.rc
}

// watchReleases subscribes to release events once, so that a changed
// rollout reaches this relay at once rather than after PlanTTL.
func (c *Client) watchReleases(rc *releaseCache) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.watching {
		return
	}
	if _, err := c.NC.Subscribe(controlplane.SubjectReleaseEvents, func(*nats.Msg) {
		rc.mu.Lock()
		rc.stale = true
		rc.events++
		rc.mu.Unlock()
	}); err == nil {
		rc.watching = true
	}
}

// Plan returns the control plane's current RolloutPlan, cached. While the
// control plane cannot be reached, the last plan fetched stands.
func (c *Client) Plan(ctx context.Context) (controlplane.RolloutPlan, error) {
	rc := c.releaseCache()
	c.watchReleases(rc)
	fresh := func() bool {
		rc.mu.Lock()
		defer rc.mu.Unlock()
		return !rc.stale && time.Since(rc.at) < cmp.Or(c.PlanTTL, 30*time.Second)
	}
	if !fresh() {
		rc.fetch.Lock()
		if !fresh() {
			rc.mu.Lock()
			seen := rc.events
			rc.mu.Unlock()
			var plan controlplane.RolloutPlan
			err := c.call(ctx, controlplane.SubjectReleasePlan, struct{}{}, &plan)
			if err != nil {
				rc.fetch.Unlock()
				rc.mu.Lock()
				defer rc.mu.Unlock()
				if !rc.at.IsZero() && controlplane.KindOf(err) == controlplane.KindUnavailable {
					// The control plane is away: the last plan stands.
					return rc.plan, nil
				}
				return controlplane.RolloutPlan{}, err
			}
			var man release.Manifest
			if plan.Release != nil {
				if man, err = release.Parse(plan.Release.Manifest); err != nil {
					rc.fetch.Unlock()
					return controlplane.RolloutPlan{}, fmt.Errorf("rollout plan's release: %w", err)
				}
			}
			devices := make(map[string]bool, len(plan.Devices))
			for _, id := range plan.Devices {
				devices[id] = true
			}
			rc.mu.Lock()
			rc.plan, rc.manifest, rc.devices, rc.at, rc.stale, rc.refused = plan, man, devices, time.Now(), rc.events != seen, nil
			rc.mu.Unlock()
		}
		rc.fetch.Unlock()
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.plan, nil
}

// Offer answers from the cached plan: the release of the active rollout
// when the device is among those chosen, runs a release the manifest
// allows it to update from (release.CanUpdateFrom: not a development
// build, older, not below min_version), and has not refused or rolled
// back from it.
func (c *Client) Offer(ctx context.Context, deviceID, agentVersion string) (controlplane.Release, bool, error) {
	plan, err := c.Plan(ctx)
	if err != nil {
		return controlplane.Release{}, false, err
	}
	if plan.Rollout == nil || plan.Release == nil || plan.Rollout.State != controlplane.RolloutActive {
		return controlplane.Release{}, false, nil
	}
	rc := c.releaseCache()
	rc.mu.Lock()
	chosen, refused, man := rc.devices[deviceID], rc.refused[deviceID], rc.manifest
	rc.mu.Unlock()
	if !chosen || refused || man.CanUpdateFrom(agentVersion) != nil {
		return controlplane.Release{}, false, nil
	}
	return *plan.Release, true, nil
}

// Latest returns the newest complete release, cached as the plan is
// (install.sh and its downloads ask on every request): fetched again
// after PlanTTL or a release event.
func (c *Client) Latest(ctx context.Context) (controlplane.Release, bool, error) {
	rc := c.releaseCache()
	c.watchReleases(rc)
	rc.mu.Lock()
	if rc.latest != nil && rc.latestEvents == rc.events && time.Since(rc.latestAt) < cmp.Or(c.PlanTTL, 30*time.Second) {
		resp := *rc.latest
		rc.mu.Unlock()
		return resp.Release, resp.OK, nil
	}
	seen := rc.events
	rc.mu.Unlock()
	var resp controlplane.LatestResponse
	if err := c.call(ctx, controlplane.SubjectReleaseLatest, struct{}{}, &resp); err != nil {
		return controlplane.Release{}, false, err
	}
	rc.mu.Lock()
	rc.latest, rc.latestAt, rc.latestEvents = &resp, time.Now(), seen
	rc.mu.Unlock()
	return resp.Release, resp.OK, nil
}

// Release returns a complete release by version.
func (c *Client) Release(ctx context.Context, version string) (controlplane.Release, error) {
	var rel controlplane.Release
	return rel, c.call(ctx, controlplane.SubjectReleaseGet, version, &rel)
}

// ReportUpdate records an agent's update status. A device that refused
// the release or rolled back from it is not offered it again by this
// client (nor, from its next plan, by any relay).
func (c *Client) ReportUpdate(ctx context.Context, r controlplane.UpdateReport) error {
	if err := c.call(ctx, controlplane.SubjectReleaseReport, r, nil); err != nil {
		return err
	}
	if r.State == frames.UpdateRefused || r.State == frames.UpdateRolledBack {
		rc := c.releaseCache()
		rc.mu.Lock()
		if rc.plan.Release != nil && rc.plan.Release.Version == r.Version {
			if rc.refused == nil {
				rc.refused = map[string]bool{}
			}
			rc.refused[r.DeviceID] = true
		}
		rc.mu.Unlock()
	}
	return nil
}

// OpenArtifact reads a release's binary for arch from offset, in chunks
// of controlplane.MaxArtifactChunk, one request each as the reader is
// read. It checks every chunk against the release's manifest (size), and
// a read from offset 0 against its SHA-256 at the end: a mismatch is an
// error, never io.EOF. The manifest is not verified here: callers that
// serve agents verify it (relay/releasecache).
func (c *Client) OpenArtifact(ctx context.Context, version, arch string, offset int64) (io.ReadCloser, int64, error) {
	rel, err := c.Release(ctx, version)
	if err != nil {
		return nil, 0, err
	}
	man, err := release.Parse(rel.Manifest)
	if err != nil {
		return nil, 0, fmt.Errorf("release %s: %w", version, err)
	}
	a, ok := man.Artifacts[arch]
	if !ok {
		return nil, 0, controlplane.Errorf(controlplane.KindNotFound, "release %s has no binary for %q", version, arch)
	}
	if offset < 0 || offset > a.Size {
		return nil, 0, controlplane.Errorf(controlplane.KindInvalid, "offset %d out of range (size %d)", offset, a.Size)
	}
	r := &artifactReader{c: c, ctx: ctx, version: version, arch: arch, art: a, off: offset}
	if offset == 0 {
		r.hash = sha256.New()
	}
	return r, a.Size, nil
}

// errArtifactMismatch: the control plane's bytes do not match the manifest.
var errArtifactMismatch = errors.New("release binary does not match its manifest")

type artifactReader struct {
	c       *Client
	ctx     context.Context
	version string
	arch    string
	art     release.Artifact
	off     int64
	buf     []byte
	hash    interface {
		io.Writer
		Sum([]byte) []byte
	}
	err error
}

func (r *artifactReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if len(r.buf) == 0 {
		if r.off == r.art.Size {
			r.err = io.EOF
			if r.hash != nil && hex.EncodeToString(r.hash.Sum(nil)) != r.art.SHA256 {
				r.err = fmt.Errorf("%s of %s: SHA-256 differs: %w", r.art.File, r.version, errArtifactMismatch)
			}
			return 0, r.err
		}
		var chunk controlplane.ArtifactChunk
		want := int(min(int64(controlplane.MaxArtifactChunk), r.art.Size-r.off))
		err := r.c.call(r.ctx, controlplane.SubjectReleaseArtifact, controlplane.ArtifactRequest{
			Version: r.version, Arch: r.arch, Offset: r.off, Length: want}, &chunk)
		if err != nil {
			r.err = fmt.Errorf("fetch %s of %s at %d: %w", r.art.File, r.version, r.off, err)
			return 0, r.err
		}
		if chunk.Size != r.art.Size || len(chunk.Data) != want {
			r.err = fmt.Errorf("%s of %s at %d: got %d bytes of %d, want %d of %d: %w",
				r.art.File, r.version, r.off, len(chunk.Data), chunk.Size, want, r.art.Size, errArtifactMismatch)
			return 0, r.err
		}
		if r.hash != nil {
			r.hash.Write(chunk.Data)
		}
		r.buf = chunk.Data
		r.off += int64(want)
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *artifactReader) Close() error {
	r.err = errors.New("read after close")
	r.buf = nil
	return nil
}
