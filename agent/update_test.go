package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"aead.dev/minisign"
	"github.com/tetherfleet/tether/agent/update"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

// releaseKey is a release key pair for tests.
func releaseKey(t testing.TB) (release.Keys, minisign.PrivateKey) {
	t.Helper()
	pubFile, privFile, err := release.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	priv, err := release.ReadPrivateKey(privFile, "")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(pubFile)), "\n")
	keys, err := release.ParseKeys(lines[len(lines)-1:])
	if err != nil {
		t.Fatal(err)
	}
	return keys, priv
}

// signedOffer is an offer of version with one binary for arch, signed by
// priv.
func signedOffer(t testing.TB, priv minisign.PrivateKey, version, arch string, binary []byte) *frames.UpdateOffer {
	t.Helper()
	sum := sha256.Sum256(binary)
	m := release.Manifest{Version: version, CreatedAt: time.Unix(1_700_000_000, 0).UTC(), Artifacts: map[string]release.Artifact{
		arch: {File: "tether-agent-linux-" + arch, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(binary))},
	}}
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	sig, err := release.Sign(b, priv)
	if err != nil {
		t.Fatal(err)
	}
	return &frames.UpdateOffer{Version: version, Manifest: b, Signature: sig}
}

// offerAgent is an agent at version with an updater over a fake binary.
func offerAgent(t testing.TB, version string, keys release.Keys) *Agent {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "tether-agent")
	if err := os.WriteFile(bin, []byte("binary "+version), 0o755); err != nil {
		t.Fatal(err)
	}
	u, err := update.New(update.Config{Binary: bin, StateDir: dir, Version: version})
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{RelayURLs: []string{"wss://relay.test"}, StateDir: dir, Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}},
		Version: version, Updater: u, ReleaseKeys: keys, Arch: "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestCheckOffer: the agent takes only a release signed by its keys, for
// its architecture, newer than itself and never rolled back here.
func TestCheckOffer(t *testing.T) {
	keys, priv := releaseKey(t)
	_, other := releaseKey(t)
	bin := []byte("binary v2")
	good := signedOffer(t, priv, "v2.0.0", "arm64", bin)
	for name, tc := range map[string]struct {
		version string
		offer   *frames.UpdateOffer
		want    error  // nil: taken
		reason  string // in the error
	}{
		"good":           {"v1.0.0", good, nil, ""},
		"other key":      {"v1.0.0", signedOffer(t, other, "v2.0.0", "arm64", bin), release.ErrUnverified, ""},
		"other arch":     {"v1.0.0", signedOffer(t, priv, "v2.0.0", "armv7", bin), nil, "no binary for arm64"},
		"downgrade":      {"v3.0.0", good, release.ErrDowngrade, ""},
		"same":           {"v2.0.0", good, release.ErrSameVersion, ""},
		"dev build":      {"dev", good, release.ErrDevBuild, ""},
		"renamed":        {"v1.0.0", &frames.UpdateOffer{Version: "v9.0.0", Manifest: good.Manifest, Signature: good.Signature}, nil, "signed manifest is v2.0.0"},
		"tampered":       {"v1.0.0", &frames.UpdateOffer{Version: "v2.0.0", Manifest: []byte(strings.Replace(string(good.Manifest), "arm64", "amd64", 1)), Signature: good.Signature}, release.ErrUnverified, ""},
		"no signature":   {"v1.0.0", &frames.UpdateOffer{Version: "v2.0.0", Manifest: good.Manifest}, release.ErrUnverified, ""},
		"garbage":        {"v1.0.0", &frames.UpdateOffer{Version: "v2.0.0", Manifest: []byte("{"), Signature: []byte("x")}, release.ErrUnverified, ""},
		"empty manifest": {"v1.0.0", &frames.UpdateOffer{}, release.ErrUnverified, ""},
	} {
		t.Run(name, func(t *testing.T) {
			a := offerAgent(t, tc.version, keys)
			rel, err := a.checkOffer(tc.offer)
			switch {
			case tc.want == nil && tc.reason == "":
				if err != nil {
					t.Fatal(err)
				}
				if rel.Version != "v2.0.0" || rel.Size != int64(len(bin)) || len(rel.SHA256) != 64 {
					t.Errorf("release %+v", rel)
				}
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("err %v, want %v", err, tc.want)
			case tc.reason != "" && (err == nil || !strings.Contains(err.Error(), tc.reason)):
				t.Fatalf("err %v, want %q", err, tc.reason)
			}
		})
	}
	t.Run("no keys", func(t *testing.T) {
		if _, err := offerAgent(t, "v1.0.0", nil).checkOffer(good); !errors.Is(err, release.ErrUnverified) {
			t.Fatalf("err %v", err)
		}
	})
	t.Run("rolled back before", func(t *testing.T) {
		a := offerAgent(t, "v1.0.0", keys)
		u := a.cfg.Updater
		if err := u.Apply(strings.NewReader(string(bin)), update.Release{Version: "v2.0.0", Size: int64(len(bin)), SHA256: sha(bin)}); err != nil {
			t.Fatal(err)
		}
		if err := u.Rollback("test"); !errors.Is(err, update.ErrRestart) {
			t.Fatal(err)
		}
		if _, err := a.checkOffer(good); err == nil || !strings.Contains(err.Error(), "rolled back") {
			t.Fatalf("err %v", err)
		}
	})
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestArch(t *testing.T) {
	if a := Arch(); a == "" || a == "arm" {
		t.Errorf("Arch() = %q", a)
	}
}

// FuzzOffer feeds update-offer frames from a hostile relay to the offer
// check: it must answer, never panic, and take nothing that is not signed
// by the agent's key.
func FuzzOffer(f *testing.F) {
	keys, priv := releaseKey(f)
	good := signedOffer(f, priv, "v2.0.0", "arm64", []byte("binary v2"))
	f.Add(frames.Append(nil, good))
	f.Add(frames.Append(nil, &frames.UpdateOffer{Version: "v2.0.0", Manifest: good.Manifest}))
	f.Add(frames.Append(nil, &frames.UpdateOffer{Version: "v2.0.0", Manifest: []byte(`{"version":"v9.0.0","artifacts":{}}`), Signature: good.Signature}))
	f.Add([]byte{byte(frames.TypeUpdateOffer), 0, 0, 0, 2, 0xff, 0xff})
	a := offerAgent(f, "v1.0.0", keys)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := frames.Read(strings.NewReader(string(b)), 0)
		o, ok := m.(*frames.UpdateOffer)
		if err != nil || !ok {
			return
		}
		rel, err := a.checkOffer(o)
		if err != nil {
			return
		}
		// Only the seed's signed manifest verifies.
		if string(o.Manifest) != string(good.Manifest) || rel.Version != "v2.0.0" {
			t.Fatalf("took an offer not signed by the agent's key: %q", o.Manifest)
		}
	})
}

// TestTakeOffer drives the whole offer in a synctest bubble over a piped
// session: the relay cuts the first download stream halfway, the agent
// fetches again from where it stopped, never faster than its rate, checks
// and swaps the binary, says downloading, and ends Run for the restart.
func TestTakeOffer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		keys, priv := releaseKey(t)
		binary := make([]byte, 256<<10)
		for i := range binary {
			binary[i] = byte(i * 7)
		}
		a := offerAgent(t, "v1.0.0", keys)
		a.cfg.UpdateRate = 64 << 10
		p := newPipeSession(t, a)
		a.cur.Store(p.c)
		ctx, cancel := context.WithCancelCause(t.Context())
		defer cancel(nil)
		a.restart = cancel

		var offsets []uint64
		relayDone := make(chan struct{})
		go func() { // the relay: two fetches, the first one cut
			defer close(relayDone)
			for i := range 2 {
				st, err := p.relayMux.AcceptStream()
				if err != nil {
					return
				}
				m, err := frames.Read(st, 0)
				f, ok := m.(*frames.Fetch)
				if err != nil || !ok || f.Version != "v2.0.0" || f.Arch != "arm64" {
					t.Errorf("fetch %d: %#v, %v", i, m, err)
					st.Close()
					return
				}
				offsets = append(offsets, f.Offset)
				frames.Write(st, &frames.StreamAccept{})
				end := len(binary)
				if i == 0 {
					end = len(binary) / 2
				}
				st.Write(binary[f.Offset:end])
				st.Close()
			}
		}()
		statuses := make(chan *frames.UpdateStatus, 8)
		go func() {
			for {
				m, err := frames.Read(p.relayCtrl, 0)
				if err != nil {
					close(statuses)
					return
				}
				if s, ok := m.(*frames.UpdateStatus); ok {
					statuses <- s
				}
			}
		}()

		start := time.Now()
		a.takeOffer(ctx, signedOffer(t, priv, "v2.0.0", "arm64", binary))
		took := time.Since(start)
		<-relayDone
		if len(offsets) != 2 || offsets[0] != 0 || offsets[1] != uint64(len(binary)/2) {
			t.Fatalf("fetched at %v, want 0 then %d", offsets, len(binary)/2)
		}
		// 256 KiB at 64 KiB/s, less the first burst of 32 KiB.
		if least := 3500 * time.Millisecond; took < least {
			t.Errorf("downloaded in %v, under the rate (at least %v)", took, least)
		}
		if cause := context.Cause(ctx); !errors.Is(cause, update.ErrRestart) {
			t.Fatalf("run not ended for a restart: %v", cause)
		}
		if b, err := os.ReadFile(a.cfg.Updater.Binary()); err != nil || string(b) != string(binary) {
			t.Fatalf("binary not swapped in (%d bytes, %v)", len(b), err)
		}
		p.c.close()
		var got []string
		for s := range statuses {
			got = append(got, s.State)
		}
		if len(got) != 1 || got[0] != frames.UpdateDownloading {
			t.Errorf("statuses %v, want downloading", got)
		}
	})
}
