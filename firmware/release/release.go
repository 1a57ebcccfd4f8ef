// Package release is the signed agent release: its manifest and the
// manifest's JSON, minisign signing and verification (aead.dev/minisign,
// so that `minisign -V` verifies a manifest too), release version
// comparison, the rules an agent applies before taking a release
// (CanUpdateFrom), and the deterministic choice of the devices a staged
// rollout reaches (Selected, Choose).
//
// The agent imports this package: it depends on nothing but the standard
// library and aead.dev/minisign.
package release

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Limits on what Parse accepts.
const (
	// MaxManifestSize bounds a manifest file.
	MaxManifestSize = 64 << 10
	// MaxSignatureSize bounds a .minisig file (one is some 300 bytes).
	MaxSignatureSize = 4 << 10
	// MaxArtifactSize bounds an agent binary.
	MaxArtifactSize = 256 << 20
	// maxArtifacts bounds the architectures of one manifest.
	maxArtifacts = 32
)

// ManifestFile and SignatureFile are the names of a release's manifest
// and signature, in ./dist and on the relay's /_tether/release/.
const (
	ManifestFile  = "manifest.json"
	SignatureFile = ManifestFile + ".minisig"
)

// Arches are the architectures agents are built for (cross.Target.Arch
// names); a manifest may name others, for agents built later.
var Arches = []string{"armv6", "armv7", "arm64", "amd64", "riscv64", "mipsle"}

// Manifest describes a release. Its JSON, exactly as signed, travels with
// its signature; nothing else about a release is trusted.
type Manifest struct {
	// Version is the release's version (vMAJOR.MINOR.PATCH[-PRE]).
	Version string `json:"version"`
	// MinVersion: agents older than it must not take this release
	// (they first update to a release in between). Empty: any.
	MinVersion string `json:"min_version,omitempty"`
	// Floor: once an agent has run this release, it never takes a
	// release below Floor (CanUpdateFrom's floors). Empty: none.
	Floor string `json:"floor,omitempty"`
	// CreatedAt is when the manifest was signed.
	CreatedAt time.Time `json:"created_at"`
	// Artifacts are the agent binaries by architecture (Arches).
	Artifacts map[string]Artifact `json:"artifacts"`
}

// Artifact is one agent binary of a release.
type Artifact struct {
	// File is the binary's file name (tether-agent-linux-ARCH): a plain
	// name, no directory.
	File string `json:"file"`
	// SHA256 is the binary's SHA-256, in lower-case hex.
	SHA256 string `json:"sha256"`
	// Size is the binary's size in bytes.
	Size int64 `json:"size"`
}

// ErrInvalid is wrapped by every error of Parse.
var ErrInvalid = errors.New("invalid release manifest")

// Parse decodes and checks a manifest: at most MaxManifestSize bytes of
// one JSON object (nothing after it), no unknown fields (a release that
// adds a field must first reach agents that know it), a release version, min_version and floor not above it, and at
// least one artifact, each with a plain file name, a SHA-256 and a size
// in (0, MaxArtifactSize]; no two artifacts share a file name.
//
// Parse checks the manifest, not its signature: use Verify for a
// manifest received from anywhere.
func Parse(data []byte) (Manifest, error) {
	var m Manifest
	if len(data) > MaxManifestSize {
		return m, fmt.Errorf("%w: %d bytes, at most %d", ErrInvalid, len(data), MaxManifestSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Manifest{}, fmt.Errorf("%w: data after the JSON object", ErrInvalid)
	}
	if err := m.Check(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// Check checks the manifest's fields as Parse does.
func (m Manifest) Check() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
	}
	v, err := ParseVersion(m.Version)
	if err != nil {
		return bad("%v", err)
	}
	for _, f := range []struct{ name, value string }{{"min_version", m.MinVersion}, {"floor", m.Floor}} {
		if f.value == "" {
			continue
		}
		w, err := ParseVersion(f.value)
		if err != nil {
			return bad("%s: %v", f.name, err)
		}
		if w.Compare(v) > 0 {
			return bad("%s %s is above the release's version %s", f.name, f.value, m.Version)
		}
	}
	if m.CreatedAt.IsZero() {
		return bad("no created_at")
	}
	if len(m.Artifacts) == 0 {
		return bad("no artifacts")
	}
	if len(m.Artifacts) > maxArtifacts {
		return bad("%d artifacts, at most %d", len(m.Artifacts), maxArtifacts)
	}
	files := map[string]string{}
	for _, arch := range slices.Sorted(maps.Keys(m.Artifacts)) {
		a := m.Artifacts[arch]
		if !plainName(arch, 16) {
			return bad("architecture %q is not a plain name", arch)
		}
		if !plainName(a.File, 128) {
			return bad("%s: file %q is not a plain file name", arch, a.File)
		}
		if other, dup := files[a.File]; dup {
			return bad("%s and %s name the same file %s", other, arch, a.File)
		}
		files[a.File] = arch
		if len(a.SHA256) != 64 || strings.ToLower(a.SHA256) != a.SHA256 {
			return bad("%s: sha256 must be 64 lower-case hex digits", arch)
		}
		if _, err := hex.DecodeString(a.SHA256); err != nil {
			return bad("%s: sha256: %v", arch, err)
		}
		if a.Size <= 0 || a.Size > MaxArtifactSize {
			return bad("%s: size %d out of range (1 to %d bytes)", arch, a.Size, MaxArtifactSize)
		}
	}
	return nil
}

// plainName: letters, digits, '.', '_' and '-', not starting with '.'.
func plainName(s string, max int) bool {
	if s == "" || len(s) > max || s[0] == '.' || s[0] == '-' {
		return false
	}
	return strings.Trim(s, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._-") == ""
}

// Marshal encodes the manifest as tetherctl writes manifest.json
// (indented, newline-terminated), after checking it.
func (m Manifest) Marshal() ([]byte, error) {
	if err := m.Check(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return append(b, '\n'), nil
}

// ArtifactByFile returns the architecture and artifact whose file is
// name.
func (m Manifest) ArtifactByFile(name string) (arch string, a Artifact, ok bool) {
	for arch, a := range m.Artifacts {
		if a.File == name {
			return arch, a, true
		}
	}
	return "", Artifact{}, false
}

// Errors of CanUpdateFrom.
var (
	// ErrDevBuild: the running agent is a development build (no release
	// version); it is never updated over the air.
	ErrDevBuild = errors.New("a development build is never updated over the air")
	// ErrSameVersion: the agent already runs this release.
	ErrSameVersion = errors.New("already runs this version")
	// ErrDowngrade: the release is older than the running agent.
	ErrDowngrade = errors.New("agents never downgrade")
	// ErrBelowMinVersion: the agent is older than the release's min_version.
	ErrBelowMinVersion = errors.New("the agent is older than the release's min_version")
	// ErrBelowFloor: the release is below a floor of a release the agent ran.
	ErrBelowFloor = errors.New("the release is below the floor of a release this agent ran")
)

// CanUpdateFrom reports why an agent running version current must not
// take this release, or nil: current must be a release version (else
// ErrDevBuild), older than m.Version (ErrSameVersion, ErrDowngrade), and
// not older than m.MinVersion (ErrBelowMinVersion); m.Version must not be
// below any of floors (ErrBelowFloor): the floors of the releases the
// agent ran, which it keeps. A manifest that does not Check is refused.
func (m Manifest) CanUpdateFrom(current string, floors ...string) error {
	if err := m.Check(); err != nil {
		return err
	}
	target, _ := ParseVersion(m.Version)
	cur, err := ParseVersion(current)
	if err != nil {
		return fmt.Errorf("update %q to %s: %w", trunc(current), m.Version, ErrDevBuild)
	}
	switch c := target.Compare(cur); {
	case c == 0:
		return fmt.Errorf("update %s to %s: %w", current, m.Version, ErrSameVersion)
	case c < 0:
		return fmt.Errorf("update %s to %s: %w", current, m.Version, ErrDowngrade)
	}
	if m.MinVersion != "" {
		min, _ := ParseVersion(m.MinVersion)
		if cur.Compare(min) < 0 {
			return fmt.Errorf("update %s to %s (min_version %s): %w", current, m.Version, m.MinVersion, ErrBelowMinVersion)
		}
	}
	for _, f := range floors {
		if f == "" {
			continue
		}
		fv, err := ParseVersion(f)
		if err != nil {
			return fmt.Errorf("floor: %w", err)
		}
		if target.Compare(fv) < 0 {
			return fmt.Errorf("update %s to %s (floor %s): %w", current, m.Version, f, ErrBelowFloor)
		}
	}
	return nil
}

// versionComment is the trusted comment's field that carries the version.
const versionComment = "version:"

// trustedComment is what Sign signs along with the manifest, as minisign
// writes it ("timestamp:… file:… " tab-separated), plus the version.
func trustedComment(version string, at time.Time) string {
	return "timestamp:" + strconv.FormatInt(at.Unix(), 10) + "\tfile:" + ManifestFile + "\t" + versionComment + version
}
