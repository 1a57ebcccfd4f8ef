package relay

// The relay's public release endpoints, on its HTTPS listener at its own
// names (not at service hostnames):
//
//	GET /install.sh                             firmware.InstallScript with this relay's URL and release keys
//	GET /_tether/release/manifest.json          the latest release's manifest, exactly as signed
//	GET /_tether/release/manifest.json.minisig  its signature
//	GET /_tether/release/FILE                   a binary the manifest names (Range supported)
//
// All serve the newest complete release whose manifest verifies with the
// relay's keys, and answer 404 with a message when there is none.

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/firmware"
	"github.com/tetherfleet/tether/firmware/release"
)

// ReleasePath prefixes the release files the relay serves.
const ReleasePath = "/_tether/release/"

// InstallPath is where the relay serves install.sh.
const InstallPath = "/install.sh"

// ReleaseFiles is what the release endpoints need of Config.Releases:
// relay/releasecache.Cache implements it. Without it they answer 404.
type ReleaseFiles interface {
	controlplane.Releases
	// Keys are the release keys the relay trusts, as install.sh carries them.
	Keys() []string
	// Open returns a checked binary of a verified release.
	Open(ctx context.Context, version, arch string) (*os.File, release.Artifact, error)
}

// releaseLookupTimeout bounds finding the latest release (and fetching a
// binary from the control plane the first time it is asked for).
const releaseLookupTimeout = 2 * time.Minute

// serveRelease serves the release endpoints; it reports false for any
// other path.
func (s *Server) serveRelease(w http.ResponseWriter, r *http.Request) bool {
	name, isFile := strings.CutPrefix(r.URL.Path, ReleasePath)
	if !isFile {
		if r.URL.Path != InstallPath {
			return false
		}
		name = ""
	}
	notFound := func(msg string) {
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, msg, http.StatusNotFound)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return true
	}
	rf, ok := s.cfg.Releases.(ReleaseFiles)
	if !ok || len(rf.Keys()) == 0 {
		notFound("this relay serves no agent releases: it has no release keys (TETHER_RELEASE_KEYS)")
		return true
	}
	ctx, cancel := context.WithTimeout(r.Context(), releaseLookupTimeout)
	defer cancel()
	rel, ok, err := rf.Latest(ctx)
	if err != nil {
		s.log.Warn("release endpoint: no latest release", "path", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", "10")
		http.Error(w, "the latest release cannot be read right now; try again shortly", http.StatusServiceUnavailable)
		return true
	}
	if !ok {
		notFound("no agent release has been published yet (tetherctl release publish)")
		return true
	}
	modified := rel.CreatedAt
	switch name {
	case "":
		if isFile {
			notFound("no such release file")
			return true
		}
		w.Header().Set("Content-Type", "text/x-shellscript; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		http.ServeContent(w, r, "install.sh", time.Time{}, bytes.NewReader(firmware.InstallScript("https://"+r.Host, rf.Keys())))
	case release.ManifestFile:
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		http.ServeContent(w, r, name, modified, bytes.NewReader(rel.Manifest))
	case release.SignatureFile:
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		http.ServeContent(w, r, name, modified, bytes.NewReader(rel.Signature))
	default:
		man, err := release.Parse(rel.Manifest) // verified by Latest
		if err != nil {
			notFound("no such release file")
			return true
		}
		arch, _, ok := man.ArtifactByFile(name)
		if !ok {
			notFound(fmt.Sprintf("release %s has no file %q", rel.Version, name))
			return true
		}
		f, _, err := rf.Open(ctx, rel.Version, arch)
		if err != nil {
			s.log.Warn("release endpoint: binary unavailable", "version", rel.Version, "arch", arch, "err", err)
			w.Header().Set("Retry-After", "10")
			http.Error(w, "the binary cannot be read right now; try again shortly", http.StatusServiceUnavailable)
			return true
		}
		defer f.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		// The same name serves the next release's binary: revalidate.
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("ETag", `"`+man.Artifacts[arch].SHA256+`"`)
		http.ServeContent(w, r, name, modified, f)
	}
	return true
}
