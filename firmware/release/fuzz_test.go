package release_test

import (
	"encoding/json"
	"testing"

	"github.com/tetherfleet/tether/firmware/release"
)

func jsonMarshal(m release.Manifest) ([]byte, error) { return json.Marshal(m) }

// FuzzParse: Parse never panics, and what it accepts re-encodes to a
// manifest that parses to the same value.
func FuzzParse(f *testing.F) {
	m := manifest("v1.4.0")
	m.MinVersion, m.Floor = "v1.2.0", "v1.3.0-rc.1"
	good, _ := m.Marshal()
	f.Add(good)
	f.Add([]byte(`{"version":"v1.0.0","created_at":"2026-01-01T00:00:00Z","artifacts":{"x":{"file":"f","sha256":"` +
		"0000000000000000000000000000000000000000000000000000000000000000" + `","size":1}}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":"v1.0.0-rc.1.2.a-b"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := release.Parse(data)
		if err != nil {
			return
		}
		again, err := m.Marshal()
		if err != nil {
			t.Fatalf("accepted manifest does not marshal: %v", err)
		}
		m2, err := release.Parse(again)
		if err != nil {
			t.Fatalf("re-encoded manifest refused: %v\n%s", err, again)
		}
		if !m2.CreatedAt.Equal(m.CreatedAt) || m2.Version != m.Version || len(m2.Artifacts) != len(m.Artifacts) {
			t.Fatalf("round trip changed the manifest: %+v vs %+v", m, m2)
		}
		_ = m.CanUpdateFrom("v0.0.1")
	})
}

// FuzzVersion: ParseVersion never panics and String round-trips.
func FuzzVersion(f *testing.F) {
	for _, s := range []string{"v1.2.3", "v1.0.0-rc.1", "dev", "v0.0.0-0.a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := release.ParseVersion(s)
		if err != nil {
			return
		}
		if v.String() != s {
			t.Fatalf("%q parsed as %q", s, v)
		}
		if v.Compare(v) != 0 {
			t.Fatal("not equal to itself")
		}
	})
}
