package main

// tetherctl release keygen|sign|publish and tetherctl releases.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"aead.dev/minisign"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/firmware/release"
)

// agentPrefix starts the names of the agent binaries `make cross` writes
// (tether-agent-linux-ARCH): the only files a manifest lists.
const agentPrefix = "tether-agent-linux-"

// publishTimeout bounds `release publish`, which uploads every binary
// (tetherctl's other commands have 30s).
const publishTimeout = 10 * time.Minute

const releaseUsage = `usage:
  tetherctl release keygen [--dir DIR]
  tetherctl release sign --key FILE --version vX.Y.Z [--min-version V] [--floor V] [--password-file F] DIST
  tetherctl release publish DIST`

// releaseOffline runs the release commands that need no control plane
// (keygen, sign); ok is false for the others.
func releaseOffline(args []string, stdout, stderr io.Writer) (ok bool, err error) {
	if len(args) == 0 {
		return true, errors.New(releaseUsage)
	}
	switch args[0] {
	case "keygen":
		return true, releaseKeygen(args[1:], stdout, stderr)
	case "sign":
		return true, releaseSign(args[1:], stdout, stderr)
	}
	return false, nil
}

func releaseCmd(ctx context.Context, c *httpapi.Client, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "publish" {
		return errors.New(releaseUsage)
	}
	fs := flag.NewFlagSet("release publish", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("usage: tetherctl release publish DIST")
	}
	// Uploads take longer than a listing: a fresh deadline, still ended
	// by Ctrl-C (ctx's cancellation is not inherited: only its deadline
	// is dropped).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), publishTimeout)
	defer cancel()
	return releasePublish(ctx, c, fs.Arg(0), stdout)
}

func releaseKeygen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("release keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", ".", "where to write tether-release.key (private, 0600) and tether-release.pub")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return errors.New("usage: tetherctl release keygen [--dir DIR]")
	}
	privPath, pubPath := filepath.Join(*dir, "tether-release.key"), filepath.Join(*dir, "tether-release.pub")
	pubFile, privFile, err := release.GenerateKey()
	if err != nil {
		return err
	}
	// O_EXCL: an existing key is never overwritten.
	if err := writeNew(privPath, privFile, 0o600); err != nil {
		return err
	}
	if err := writeNew(pubPath, pubFile, 0o644); err != nil {
		os.Remove(privPath)
		return err
	}
	pub, _ := release.ReadPublicKey(pubFile)
	fmt.Fprintf(stdout, "private key: %s (keep it offline; tetherctl release sign --key %s)\n", privPath, privPath)
	fmt.Fprintf(stdout, "public key:  %s\n\nGive the public key to the control plane, the relays and the agents:\n  TETHER_RELEASE_KEYS=%s\n", pubPath, pub.String())
	return nil
}

// writeNew creates path with data; it fails if path exists.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s exists: not overwriting a key", path)
		}
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func releaseSign(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("release sign", flag.ContinueOnError)
	fs.SetOutput(stderr)
	keyPath := fs.String("key", "", "release private key (tetherctl release keygen, or minisign -G)")
	passFile := fs.String("password-file", "", "file holding the password of an encrypted private key")
	ver := fs.String("version", "", "the release's version, vMAJOR.MINOR.PATCH[-PRE]; the binaries must be built with it (make cross VERSION=…)")
	minVersion := fs.String("min-version", "", "agents older than this must not take the release")
	floor := fs.String("floor", "", "agents that ran this release never take one below this version")
	noVersionCheck := fs.Bool("no-version-check", false, "sign binaries that do not contain the version string")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 || *keyPath == "" || *ver == "" {
		return errors.New("usage: tetherctl release sign --key FILE --version vX.Y.Z [--min-version V] [--floor V] DIST")
	}
	dist := fs.Arg(0)
	password := ""
	if *passFile != "" {
		b, err := os.ReadFile(*passFile)
		if err != nil {
			return fmt.Errorf("read password file: %w", err)
		}
		password = strings.TrimRight(string(b), "\r\n")
	}
	keyData, err := os.ReadFile(*keyPath)
	if err != nil {
		return fmt.Errorf("read release key: %w", err)
	}
	key, err := release.ReadPrivateKey(keyData, password)
	if err != nil {
		return err
	}
	m := release.Manifest{Version: *ver, MinVersion: *minVersion, Floor: *floor, CreatedAt: time.Now().UTC().Truncate(time.Second), Artifacts: map[string]release.Artifact{}}
	entries, err := os.ReadDir(dist)
	if err != nil {
		return fmt.Errorf("read %s: %w", dist, err)
	}
	for _, e := range entries {
		arch, ok := strings.CutPrefix(e.Name(), agentPrefix)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		if !slices.Contains(release.Arches, arch) {
			fmt.Fprintf(stderr, "skipping %s: %q is not an agent architecture (%s)\n", e.Name(), arch, strings.Join(release.Arches, " "))
			continue
		}
		a, err := hashFile(filepath.Join(dist, e.Name()), *ver, *noVersionCheck)
		if err != nil {
			return err
		}
		m.Artifacts[arch] = a
	}
	if len(m.Artifacts) == 0 {
		return fmt.Errorf("no %s* binaries in %s: run make cross VERSION=%s first", agentPrefix, dist, *ver)
	}
	manifest, err := m.Marshal()
	if err != nil {
		return err
	}
	sig, err := release.Sign(manifest, key)
	if err != nil {
		return err
	}
	// What agents will do: verify with the public key.
	pub, _ := key.Public().(minisign.PublicKey)
	if _, err := release.Verify(manifest, sig, release.Keys{pub}); err != nil {
		return fmt.Errorf("the new signature does not verify: %w", err)
	}
	if err := writeAtomic(filepath.Join(dist, release.ManifestFile), manifest); err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(dist, release.SignatureFile), sig); err != nil {
		return err
	}
	arches := slices.Sorted(func(yield func(string) bool) {
		for a := range m.Artifacts {
			if !yield(a) {
				return
			}
		}
	})
	fmt.Fprintf(stdout, "signed %s (%s) with key %016X: %s, %s\n", *ver, strings.Join(arches, " "), key.ID(),
		filepath.Join(dist, release.ManifestFile), filepath.Join(dist, release.SignatureFile))
	return nil
}

// hashFile returns a binary's artifact entry; unless told not to, it
// checks that the binary carries the version string (stamped by make
// cross VERSION=…): an agent reporting another version would be offered
// its own release forever.
func hashFile(path, version string, noCheck bool) (release.Artifact, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return release.Artifact{}, fmt.Errorf("read binary: %w", err)
	}
	if !noCheck && !bytes.Contains(data, []byte(version)) {
		return release.Artifact{}, fmt.Errorf("%s does not contain the version string %s: build it with make cross VERSION=%s (or sign with --no-version-check)", path, version, version)
	}
	sum := sha256.Sum256(data)
	return release.Artifact{File: filepath.Base(path), SHA256: hex.EncodeToString(sum[:]), Size: int64(len(data))}, nil
}

// writeAtomic writes path through a temporary file and a rename.
func writeAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// releasePublish uploads DIST's manifest and signature, then each binary
// the control plane does not have yet (a publish that failed half-way
// resumes).
func releasePublish(ctx context.Context, c *httpapi.Client, dist string, stdout io.Writer) error {
	manifest, err := os.ReadFile(filepath.Join(dist, release.ManifestFile))
	if err != nil {
		return fmt.Errorf("read manifest (tetherctl release sign first): %w", err)
	}
	sig, err := os.ReadFile(filepath.Join(dist, release.SignatureFile))
	if err != nil {
		return fmt.Errorf("read signature: %w", err)
	}
	m, err := release.Parse(manifest)
	if err != nil {
		return err
	}
	info, err := c.PublishRelease(ctx, manifest, sig)
	if err != nil {
		return err
	}
	for _, arch := range info.Missing {
		a := m.Artifacts[arch]
		f, err := os.Open(filepath.Join(dist, a.File))
		if err != nil {
			return fmt.Errorf("open binary: %w", err)
		}
		fi, err := f.Stat()
		if err == nil && fi.Size() != a.Size {
			err = fmt.Errorf("%s is %d bytes, the manifest says %d: sign again", a.File, fi.Size(), a.Size)
		}
		if err == nil {
			info, err = c.UploadArtifact(ctx, m.Version, arch, f, a.Size)
		}
		f.Close()
		if err != nil {
			return fmt.Errorf("upload %s: %w", a.File, err)
		}
		fmt.Fprintf(stdout, "uploaded %s (%d bytes)\n", a.File, a.Size)
	}
	if !info.Complete {
		return fmt.Errorf("release %s is not complete on the control plane: missing %s", info.Version, strings.Join(info.Missing, ", "))
	}
	fmt.Fprintf(stdout, "published %s (%s); start a rollout: tetherctl rollout start %s --percent 10\n", info.Version, strings.Join(info.Arches, " "), info.Version)
	return nil
}

func printReleases(w io.Writer, rs []controlplane.ReleaseInfo) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tMIN VERSION\tFLOOR\tARCHES\tSTATUS\tCREATED")
	for _, r := range rs {
		status := "complete"
		if !r.Complete {
			status = "missing " + strings.Join(r.Missing, ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Version, dash(r.MinVersion), dash(r.Floor), strings.Join(r.Arches, ","), status, r.CreatedAt.Local().Format(time.RFC3339))
	}
	tw.Flush()
}
