package controlplanetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"
	"time"

	"aead.dev/minisign"
	"github.com/tetherfleet/tether/firmware/release"
)

// ReleaseKey is a release signing key, as an operator keeps it.
type ReleaseKey struct {
	// Keys holds the public key (Options.ReleaseKeys); Public is its
	// "RW…" form (TETHER_RELEASE_KEYS).
	Keys    release.Keys
	Public  string
	Private minisign.PrivateKey
}

// NewReleaseKey makes a release key.
func NewReleaseKey(t testing.TB) ReleaseKey {
	t.Helper()
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return ReleaseKey{Keys: release.Keys{pub}, Public: pub.String(), Private: priv}
}

// Manifest returns the manifest of binaries (by arch, each file named
// tether-agent-linux-ARCH) for version.
func Manifest(version string, binaries map[string][]byte) release.Manifest {
	m := release.Manifest{Version: version, CreatedAt: time.Now().UTC().Truncate(time.Second), Artifacts: map[string]release.Artifact{}}
	for arch, b := range binaries {
		sum := sha256.Sum256(b)
		m.Artifacts[arch] = release.Artifact{File: "tether-agent-linux-" + arch, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(b))}
	}
	return m
}

// Sign encodes and signs a manifest: manifest.json and its .minisig.
func (k ReleaseKey) Sign(t testing.TB, m release.Manifest) (manifest, sig []byte) {
	t.Helper()
	manifest, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if sig, err = release.Sign(manifest, k.Private); err != nil {
		t.Fatal(err)
	}
	return manifest, sig
}

// Publish publishes a release signed by k with its binaries on the
// control plane, as tetherctl release publish does through the admin API,
// and returns its manifest and signature.
func (e *Env) Publish(k ReleaseKey, version string, binaries map[string][]byte) (manifest, sig []byte) {
	e.T.Helper()
	manifest, sig = k.Sign(e.T, Manifest(version, binaries))
	ctx := context.Background()
	if _, err := e.CP.Releases.Publish(ctx, manifest, sig); err != nil {
		e.T.Fatal(err)
	}
	for arch, b := range binaries {
		if _, err := e.CP.Releases.PutArtifact(ctx, version, arch, bytes.NewReader(b)); err != nil {
			e.T.Fatal(err)
		}
	}
	return manifest, sig
}
