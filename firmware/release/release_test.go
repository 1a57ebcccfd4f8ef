package release_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"aead.dev/minisign"
	"github.com/tetherfleet/tether/firmware/release"
)

func manifest(version string) release.Manifest {
	sum := sha256.Sum256([]byte("binary"))
	return release.Manifest{
		Version:   version,
		CreatedAt: time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC),
		Artifacts: map[string]release.Artifact{
			"arm64": {File: "tether-agent-linux-arm64", SHA256: hex.EncodeToString(sum[:]), Size: 6},
			"amd64": {File: "tether-agent-linux-amd64", SHA256: hex.EncodeToString(sum[:]), Size: 6},
		},
	}
}

func mustMarshal(t *testing.T, m release.Manifest) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newKey(t *testing.T) (release.Keys, minisign.PrivateKey) {
	t.Helper()
	pubFile, privFile, err := release.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := release.ReadPublicKey(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := release.ReadPrivateKey(privFile, "")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := release.ParseKeys([]string{pub.String()})
	if err != nil {
		t.Fatal(err)
	}
	return keys, priv
}

func TestSignVerify(t *testing.T) {
	keys, priv := newKey(t)
	other, otherPriv := newKey(t)
	data := mustMarshal(t, manifest("v1.4.0"))
	sig, err := release.Sign(data, priv)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(sig), "version:v1.4.0") || !strings.HasPrefix(string(sig), "untrusted comment: ") {
		t.Fatalf("signature file:\n%s", sig)
	}
	m, err := release.Verify(data, sig, keys)
	if err != nil {
		t.Fatal(err)
	}
	if m.Version != "v1.4.0" || m.Artifacts["arm64"].Size != 6 {
		t.Fatalf("verified manifest: %+v", m)
	}
	// Any of several keys.
	if _, err := release.Verify(data, sig, append(other, keys...)); err != nil {
		t.Fatalf("second of two keys: %v", err)
	}
	otherSig, _ := release.Sign(data, otherPriv)
	tampered := bytes.Replace(data, []byte(`"size": 6`), []byte(`"size": 7`), 1)
	for name, c := range map[string]struct {
		data, sig []byte
		keys      release.Keys
	}{
		"another key":        {data, otherSig, keys},
		"tampered manifest":  {tampered, sig, keys},
		"no keys":            {data, sig, nil},
		"garbage signature":  {data, []byte("untrusted comment: x\nAAAA\ntrusted comment: y\nAAAA\n"), keys},
		"empty signature":    {data, nil, keys},
		"oversize signature": {data, bytes.Repeat([]byte("a"), release.MaxSignatureSize+1), keys},
	} {
		if _, err := release.Verify(c.data, c.sig, c.keys); !errors.Is(err, release.ErrUnverified) {
			t.Errorf("%s: %v, want ErrUnverified", name, err)
		}
	}
	// A trusted comment naming another version is refused even though
	// the key signed it.
	r := minisign.NewReader(bytes.NewReader(data))
	buf := make([]byte, len(data))
	r.Read(buf)
	lying := r.SignWithComments(priv, "timestamp:1\tversion:v9.9.9", "x")
	if _, err := release.Verify(data, lying, keys); !errors.Is(err, release.ErrUnverified) {
		t.Errorf("trusted comment of another version: %v", err)
	}
	// A legacy (not pre-hashed) signature verifies too, as minisign -V accepts it.
	if _, err := release.Verify(data, minisign.Sign(priv, data), keys); err != nil {
		t.Errorf("legacy signature: %v", err)
	}
	// Signing refuses an invalid manifest.
	if _, err := release.Sign([]byte(`{"version":"dev"}`), priv); !errors.Is(err, release.ErrInvalid) {
		t.Errorf("sign an invalid manifest: %v", err)
	}
}

func TestKeys(t *testing.T) {
	keys, _ := newKey(t)
	s := keys.Strings()[0]
	if !strings.HasPrefix(s, "RW") {
		t.Fatalf("public key %q, want minisign's RW… form", s)
	}
	got, err := release.ParseKeys([]string{" " + s + " ", ""})
	if err != nil || len(got) != 1 || !got[0].Equal(keys[0]) {
		t.Fatalf("ParseKeys: %v %v", got, err)
	}
	if _, err := release.ParseKeys([]string{"RWnotakey"}); err == nil {
		t.Fatal("a bad key parsed")
	}
	if _, err := release.ReadPrivateKey([]byte("nonsense"), ""); err == nil {
		t.Fatal("a bad private key parsed")
	}
}

func TestParseRefuses(t *testing.T) {
	good := string(mustMarshal(t, manifest("v1.4.0")))
	if _, err := release.Parse([]byte(good)); err != nil {
		t.Fatal(err)
	}
	edit := func(f func(*release.Manifest)) string {
		m := manifest("v1.4.0")
		f(&m)
		b, _ := jsonMarshal(m)
		return string(b)
	}
	cases := map[string]string{
		"empty":          "",
		"not an object":  "[]",
		"trailing data":  good + "{}",
		"unknown field":  strings.Replace(good, `"version"`, `"extra": 1, "version"`, 1),
		"dev version":    edit(func(m *release.Manifest) { m.Version = "dev" }),
		"no v":           edit(func(m *release.Manifest) { m.Version = "1.4.0" }),
		"build metadata": edit(func(m *release.Manifest) { m.Version = "v1.4.0+abc" }),
		"leading zero":   edit(func(m *release.Manifest) { m.Version = "v01.4.0" }),
		"min above":      edit(func(m *release.Manifest) { m.MinVersion = "v1.5.0" }),
		"floor above":    edit(func(m *release.Manifest) { m.Floor = "v2.0.0" }),
		"bad floor":      edit(func(m *release.Manifest) { m.Floor = "latest" }),
		"no created_at":  edit(func(m *release.Manifest) { m.CreatedAt = time.Time{} }),
		"no artifacts":   edit(func(m *release.Manifest) { m.Artifacts = nil }),
		"path in file":   edit(func(m *release.Manifest) { a := m.Artifacts["arm64"]; a.File = "../x"; m.Artifacts["arm64"] = a }),
		"slash in file":  edit(func(m *release.Manifest) { a := m.Artifacts["arm64"]; a.File = "a/b"; m.Artifacts["arm64"] = a }),
		"dot file":       edit(func(m *release.Manifest) { a := m.Artifacts["arm64"]; a.File = ".."; m.Artifacts["arm64"] = a }),
		"same file": edit(func(m *release.Manifest) {
			a := m.Artifacts["arm64"]
			a.File = "tether-agent-linux-amd64"
			m.Artifacts["arm64"] = a
		}),
		"upper-case hash": edit(func(m *release.Manifest) {
			a := m.Artifacts["arm64"]
			a.SHA256 = strings.ToUpper(a.SHA256)
			m.Artifacts["arm64"] = a
		}),
		"short hash": edit(func(m *release.Manifest) { a := m.Artifacts["arm64"]; a.SHA256 = "abcd"; m.Artifacts["arm64"] = a }),
		"zero size":  edit(func(m *release.Manifest) { a := m.Artifacts["arm64"]; a.Size = 0; m.Artifacts["arm64"] = a }),
		"huge size": edit(func(m *release.Manifest) {
			a := m.Artifacts["arm64"]
			a.Size = release.MaxArtifactSize + 1
			m.Artifacts["arm64"] = a
		}),
		"bad arch": edit(func(m *release.Manifest) { m.Artifacts["arm 64"] = m.Artifacts["arm64"] }),
		"oversize": good[:len(good)-2] + strings.Repeat(" ", release.MaxManifestSize) + "}",
	}
	for name, data := range cases {
		if _, err := release.Parse([]byte(data)); !errors.Is(err, release.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

func TestCanUpdateFrom(t *testing.T) {
	m := manifest("v1.4.0")
	m.MinVersion = "v1.2.0"
	m.Floor = "v1.3.0"
	for _, c := range []struct {
		current string
		floors  []string
		want    error
	}{
		{"v1.3.9", nil, nil},
		{"v1.2.0", nil, nil},
		{"v1.4.0-rc.1", nil, nil},
		{"v1.4.0", nil, release.ErrSameVersion},
		{"v1.5.0", nil, release.ErrDowngrade},
		{"v1.4.1-rc.1", nil, release.ErrDowngrade},
		{"v1.1.9", nil, release.ErrBelowMinVersion},
		{"v1.2.0-rc.1", nil, release.ErrBelowMinVersion},
		{"dev", nil, release.ErrDevBuild},
		{"c162334-dirty", nil, release.ErrDevBuild},
		{"", nil, release.ErrDevBuild},
		{"v1.3.0", []string{"v1.3.0", "", "v1.4.0"}, nil},
		{"v1.3.0", []string{"v1.5.0"}, release.ErrBelowFloor},
	} {
		err := m.CanUpdateFrom(c.current, c.floors...)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("from %q floors %v: %v, want %v", c.current, c.floors, err, c.want)
		}
	}
}

func TestCompare(t *testing.T) {
	// In order, oldest first (semver 2.0's example, and more).
	order := []string{"v0.9.9", "v1.0.0-alpha", "v1.0.0-alpha.1", "v1.0.0-alpha.beta", "v1.0.0-beta", "v1.0.0-beta.2",
		"v1.0.0-beta.11", "v1.0.0-rc.1", "v1.0.0", "v1.0.1", "v1.2.0", "v1.10.0", "v2.0.0"}
	for i, a := range order {
		for j, b := range order {
			got, err := release.Compare(a, b)
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if err != nil || got != want {
				t.Fatalf("Compare(%s, %s) = %d, %v; want %d", a, b, got, err, want)
			}
		}
		v, _ := release.ParseVersion(a)
		if v.String() != a {
			t.Fatalf("String(%s) = %s", a, v)
		}
	}
	for _, bad := range []string{"dev", "v1", "v1.2", "v1.2.3.4", "v1.2.x", "v1.2.3-", "v1.2.3-a..b", "v1.2.3-01", "v99999999999.0.0", "V1.2.3", " v1.2.3"} {
		if release.IsRelease(bad) {
			t.Errorf("%q is a release version", bad)
		}
	}
}

func TestSelected(t *testing.T) {
	// Deterministic, monotonic in percent, and close to percent of a
	// large fleet.
	const n = 20000
	counts := map[int]int{}
	for i := range n {
		id := fmt.Sprintf("device-%d", i)
		was := false
		for p := 0; p <= 100; p += 5 {
			sel := release.Selected(id, "v1.4.0", p)
			if sel != release.Selected(id, "v1.4.0", p) {
				t.Fatal("not deterministic")
			}
			if was && !sel {
				t.Fatalf("%s deselected when the percent rose to %d", id, p)
			}
			was = sel
			if sel {
				counts[p]++
			}
		}
	}
	if counts[0] != 0 || counts[100] != n {
		t.Fatalf("0%%: %d, 100%%: %d of %d", counts[0], counts[100], n)
	}
	for _, p := range []int{10, 50} {
		if got, want := counts[p], n*p/100; got < want*9/10 || got > want*11/10 {
			t.Errorf("%d%% selected %d of %d, want about %d", p, got, n, want)
		}
	}
}

func TestChoose(t *testing.T) {
	// 50 simulated devices with random keys' IDs, as enrolled agents have.
	for round := range 20 {
		ids := make([]string, 50)
		for i := range ids {
			ids[i] = fmt.Sprintf("%x", sha256.Sum256(fmt.Appendf(nil, "%d/%d", round, i)))[:26]
		}
		prev := map[string]bool{}
		for _, p := range []int{1, 10, 25, 50, 100} {
			got := release.Choose(ids, "v1.4.0", p, nil)
			if p == 10 && (len(got) < 4 || len(got) > 6) {
				t.Fatalf("10%% of 50 chose %d", len(got))
			}
			if len(got) != release.Quota(50, p) {
				t.Fatalf("%d%% of 50 chose %d, quota %d", p, len(got), release.Quota(50, p))
			}
			again := release.Choose(append([]string(nil), ids...), "v1.4.0", p, nil)
			if fmt.Sprint(again) != fmt.Sprint(got) {
				t.Fatal("not deterministic")
			}
			cur := map[string]bool{}
			for _, id := range got {
				cur[id] = true
			}
			for id := range prev {
				if !cur[id] {
					t.Fatalf("%s deselected when the percent rose to %d", id, p)
				}
			}
			prev = cur
		}
		// A device already reached stays chosen and counts.
		first := release.Choose(ids, "v1.4.0", 10, nil)
		outside := ""
		for _, id := range ids {
			if !contains(first, id) {
				outside = id
				break
			}
		}
		got := release.Choose(ids, "v1.4.0", 10, func(id string) bool { return id == outside })
		if len(got) != 5 || got[0] != outside {
			t.Fatalf("sticky device: %v", got)
		}
	}
	if n := release.Quota(3, 10); n != 1 {
		t.Fatalf("10%% of 3: %d, want at least one", n)
	}
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}
