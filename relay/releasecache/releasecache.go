// Package releasecache is a relay's copy of agent releases: a
// controlplane.Releases that wraps the control plane's (natsapi.Client)
// so that each binary crosses NATS once per relay, is checked against
// its release's manifest before anything is served from it, and is read
// from the relay's data dir after that. It offers and serves only
// releases whose manifest verifies with the relay's own release keys.
//
// Files: DIR/VERSION/manifest.json, manifest.json.minisig (kept once
// verified, read again at start) and the binaries by their manifest
// names, each written through a temporary file and renamed once checked.
package releasecache

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/firmware/release"
)

// Config configures a Cache.
type Config struct {
	// Upstream is the control plane's Releases. Required.
	Upstream controlplane.Releases
	// Dir holds the cached releases. Required.
	Dir string
	// Keys are the release keys the relay trusts (TETHER_RELEASE_KEYS).
	// Empty: nothing is offered or served.
	Keys release.Keys
	// LatestTTL is how long Latest's answer is reused (natsapi.Client
	// caches it too, until a release event). Zero means 1s.
	LatestTTL time.Duration
	// DownloadTimeout bounds one binary's download from Upstream. Zero
	// means 10 minutes.
	DownloadTimeout time.Duration
	// Logger; nil discards.
	Logger *slog.Logger
}

// Cache is a relay's release cache. It is safe for concurrent use.
type Cache struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	manifests map[string]verified  // by version
	rejected  map[[32]byte]error   // releases that did not verify, by hash of manifest and signature
	files     map[string]bool      // paths whose SHA-256 was checked by this process
	inflight  map[string]*download // by path
	latest    *controlplane.Release
	latestAt  time.Time
}

type verified struct {
	rel controlplane.Release
	man release.Manifest
}

// download is one binary being fetched; done closes when err is set.
type download struct {
	done chan struct{}
	err  error
}

var _ controlplane.Releases = (*Cache)(nil)

// New returns a Cache.
func New(cfg Config) (*Cache, error) {
	if cfg.Upstream == nil || cfg.Dir == "" {
		return nil, errors.New("releasecache: Upstream and Dir are required")
	}
	cfg.LatestTTL = cmp.Or(cfg.LatestTTL, time.Second)
	cfg.DownloadTimeout = cmp.Or(cfg.DownloadTimeout, 10*time.Minute)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create release cache dir: %w", err)
	}
	return &Cache{cfg: cfg, log: log, manifests: map[string]verified{}, rejected: map[[32]byte]error{}, files: map[string]bool{}, inflight: map[string]*download{}}, nil
}

// Keys returns the trusted release keys in their "RW…" form (install.sh
// carries them).
func (c *Cache) Keys() []string { return c.cfg.Keys.Strings() }

// verify checks a release with the relay's keys, remembers it and keeps
// its manifest and signature on disk.
func (c *Cache) verify(rel controlplane.Release) (release.Manifest, error) {
	c.mu.Lock()
	v, ok := c.manifests[rel.Version]
	c.mu.Unlock()
	if ok && bytes.Equal(v.rel.Manifest, rel.Manifest) && bytes.Equal(v.rel.Signature, rel.Signature) {
		return v.man, nil
	}
	h := sha256.New()
	h.Write(rel.Manifest)
	h.Write([]byte{0})
	h.Write(rel.Signature)
	var id [32]byte
	h.Sum(id[:0])
	c.mu.Lock()
	err, seen := c.rejected[id]
	c.mu.Unlock()
	if seen {
		return release.Manifest{}, err
	}
	man, err := release.Verify(rel.Manifest, rel.Signature, c.cfg.Keys)
	if err == nil && man.Version != rel.Version {
		err = fmt.Errorf("%w: its manifest is for %s", release.ErrUnverified, man.Version)
	}
	if err != nil {
		err = fmt.Errorf("release %q from the control plane: %w", rel.Version, err)
		c.log.Warn("a release from the control plane does not verify with this relay's TETHER_RELEASE_KEYS: it is neither offered nor served", "version", rel.Version, "err", err)
		c.mu.Lock()
		if len(c.rejected) >= 64 {
			clear(c.rejected)
		}
		c.rejected[id] = err
		c.mu.Unlock()
		return release.Manifest{}, err
	}
	dir := filepath.Join(c.cfg.Dir, man.Version)
	if err := os.MkdirAll(dir, 0o700); err == nil {
		// Best effort: the copy on disk only saves a request after a restart.
		writeFile(filepath.Join(dir, release.ManifestFile), rel.Manifest)
		writeFile(filepath.Join(dir, release.SignatureFile), rel.Signature)
	}
	c.mu.Lock()
	c.manifests[man.Version] = verified{rel: rel, man: man}
	c.mu.Unlock()
	return man, nil
}

// Offer asks the control plane and passes its offer on only if the
// release verifies.
func (c *Cache) Offer(ctx context.Context, deviceID, agentVersion string) (controlplane.Release, bool, error) {
	if len(c.cfg.Keys) == 0 {
		return controlplane.Release{}, false, nil
	}
	rel, ok, err := c.cfg.Upstream.Offer(ctx, deviceID, agentVersion)
	if err != nil || !ok {
		return controlplane.Release{}, false, err
	}
	if _, err := c.verify(rel); err != nil {
		return controlplane.Release{}, false, err
	}
	return rel, true, nil
}

// Latest returns the newest complete release if it verifies, asking the
// control plane at most every LatestTTL.
func (c *Cache) Latest(ctx context.Context) (controlplane.Release, bool, error) {
	if len(c.cfg.Keys) == 0 {
		return controlplane.Release{}, false, nil
	}
	c.mu.Lock()
	if c.latest != nil && time.Since(c.latestAt) < c.cfg.LatestTTL {
		rel := *c.latest
		c.mu.Unlock()
		return rel, rel.Version != "", nil
	}
	c.mu.Unlock()
	rel, ok, err := c.cfg.Upstream.Latest(ctx)
	if err != nil {
		return controlplane.Release{}, false, err
	}
	if ok {
		if _, err := c.verify(rel); err != nil {
			return controlplane.Release{}, false, err
		}
	} else {
		rel = controlplane.Release{}
	}
	c.mu.Lock()
	c.latest, c.latestAt = &rel, time.Now()
	c.mu.Unlock()
	return rel, ok, nil
}

// ReportUpdate passes an agent's report to the control plane.
func (c *Cache) ReportUpdate(ctx context.Context, r controlplane.UpdateReport) error {
	return c.cfg.Upstream.ReportUpdate(ctx, r)
}

// Manifest returns a verified release's manifest: one this cache
// verified, else the copy on disk, verified again.
func (c *Cache) Manifest(version string) (controlplane.Release, release.Manifest, error) {
	c.mu.Lock()
	v, ok := c.manifests[version]
	c.mu.Unlock()
	if ok {
		return v.rel, v.man, nil
	}
	if !release.IsRelease(version) {
		return controlplane.Release{}, release.Manifest{}, controlplane.Errorf(controlplane.KindNotFound, "no release %q", version)
	}
	dir := filepath.Join(c.cfg.Dir, version)
	manifest, err1 := os.ReadFile(filepath.Join(dir, release.ManifestFile))
	sig, err2 := os.ReadFile(filepath.Join(dir, release.SignatureFile))
	if err := errors.Join(err1, err2); err != nil {
		return controlplane.Release{}, release.Manifest{}, controlplane.Errorf(controlplane.KindNotFound, "release %s is not known to this relay (neither offered nor latest)", version)
	}
	rel := controlplane.Release{Version: version, Manifest: manifest, Signature: sig}
	man, err := c.verify(rel)
	if err != nil {
		return rel, man, err
	}
	rel.CreatedAt = man.CreatedAt
	return rel, man, nil
}

// OpenArtifact opens the cached binary (downloading and checking it
// first if needed), positioned at offset.
func (c *Cache) OpenArtifact(ctx context.Context, version, arch string, offset int64) (io.ReadCloser, int64, error) {
	f, a, err := c.Open(ctx, version, arch)
	if err != nil {
		return nil, 0, err
	}
	if offset < 0 || offset > a.Size {
		f.Close()
		return nil, 0, controlplane.Errorf(controlplane.KindInvalid, "offset %d out of range (size %d)", offset, a.Size)
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("seek binary: %w", err)
	}
	return f, a.Size, nil
}

// Open returns the cached binary of a verified release for arch, checked
// against the manifest: downloaded from the control plane once however
// many callers ask at the same time. The caller closes the file.
func (c *Cache) Open(ctx context.Context, version, arch string) (*os.File, release.Artifact, error) {
	_, man, err := c.Manifest(version)
	if err != nil {
		return nil, release.Artifact{}, err
	}
	a, ok := man.Artifacts[arch]
	if !ok {
		return nil, a, controlplane.Errorf(controlplane.KindNotFound, "release %s has no binary for %q", version, arch)
	}
	path := filepath.Join(c.cfg.Dir, version, a.File)
	for attempt := 0; ; attempt++ {
		f, err := c.openChecked(path, a)
		if err == nil || attempt == 1 {
			return f, a, err
		}
		if err := c.fetch(ctx, version, arch, path, a); err != nil {
			return nil, a, err
		}
	}
}

// openChecked opens path if it holds the artifact: its size, and its
// SHA-256 the first time this process opens it (a bad file is removed).
func (c *Cache) openChecked(path string, a release.Artifact) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err // not cached yet
	}
	fi, err := f.Stat()
	if err == nil && fi.Size() != a.Size {
		err = fmt.Errorf("%s: %d bytes, want %d", path, fi.Size(), a.Size)
	}
	c.mu.Lock()
	checked := c.files[path]
	c.mu.Unlock()
	if err == nil && !checked {
		h := sha256.New()
		if _, err = io.Copy(h, f); err == nil {
			if hex.EncodeToString(h.Sum(nil)) != a.SHA256 {
				err = fmt.Errorf("%s: SHA-256 differs from the manifest", path)
			} else {
				_, err = f.Seek(0, io.SeekStart)
			}
		}
	}
	if err != nil {
		f.Close()
		c.log.Warn("cached release binary is bad: fetching it again", "path", path, "err", err)
		os.Remove(path)
		return nil, err
	}
	c.mu.Lock()
	c.files[path] = true
	c.mu.Unlock()
	return f, nil
}

// fetch downloads the binary into path, once for all concurrent callers.
// The download does not end with the first caller's ctx (others may
// wait for it); each caller stops waiting when its own ctx ends.
func (c *Cache) fetch(ctx context.Context, version, arch, path string, a release.Artifact) error {
	c.mu.Lock()
	d, running := c.inflight[path]
	if !running {
		d = &download{done: make(chan struct{})}
		c.inflight[path] = d
		go func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.DownloadTimeout)
			defer cancel()
			err := c.download(dctx, version, arch, path, a)
			c.mu.Lock()
			delete(c.inflight, path)
			if err == nil {
				c.files[path] = true
			}
			d.err = err
			c.mu.Unlock()
			close(d.done)
		}()
	}
	c.mu.Unlock()
	select {
	case <-d.done:
		return d.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Cache) download(ctx context.Context, version, arch, path string, a release.Artifact) (err error) {
	start := time.Now()
	rc, size, err := c.cfg.Upstream.OpenArtifact(ctx, version, arch, 0)
	if err != nil {
		return fmt.Errorf("fetch %s of %s: %w", a.File, version, err)
	}
	defer rc.Close()
	if size != a.Size {
		return fmt.Errorf("fetch %s of %s: the control plane has %d bytes, the manifest says %d", a.File, version, size, a.Size)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+a.File+".*.tmp")
	if err != nil {
		return fmt.Errorf("cache %s: %w", a.File, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(rc, a.Size+1))
	if err != nil {
		return fmt.Errorf("fetch %s of %s: %w", a.File, version, err)
	}
	if n != a.Size || hex.EncodeToString(h.Sum(nil)) != a.SHA256 {
		return fmt.Errorf("fetch %s of %s: %d bytes that do not match the signed manifest", a.File, version, n)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("cache %s: %w", a.File, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cache %s: %w", a.File, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("cache %s: %w", a.File, err)
	}
	c.log.Info("release binary cached", "version", version, "arch", arch, "size", a.Size, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// writeFile writes data to path through a temporary file and a rename.
func writeFile(path string, data []byte) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return
	}
	tmp := path + ".tmp"
	if os.WriteFile(tmp, data, 0o600) != nil || os.Rename(tmp, path) != nil {
		os.Remove(tmp)
	}
}
