package boltstore

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
)

func TestSnapshotPages(t *testing.T) {
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), newClock())
	ctx := t.Context()
	var ids []string
	for i := range 7 {
		k := enrolled(t, s, fmt.Sprintf("pi%02d", i))
		ids = append(ids, frames.DeviceID(k))
		if i == 3 {
			connectRegister(t, s, k, controlplane.Service{Name: "web", Proto: "http"}, controlplane.Service{Name: "ssh", Proto: "tcp"})
		}
	}
	if _, err := s.Revoke(ctx, "pi05"); err != nil {
		t.Fatal(err)
	}
	slices.Sort(ids)
	var got []controlplane.DeviceRecord
	after, pages := "", 0
	for {
		page, next, err := s.Snapshot(ctx, after, 3)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		got = append(got, page...)
		if next == "" {
			break
		}
		if next != page[len(page)-1].ID {
			t.Fatalf("next %q is not the page's last ID", next)
		}
		after = next
	}
	if pages != 3 || len(got) != 7 {
		t.Fatalf("%d pages, %d records", pages, len(got))
	}
	for i, rec := range got {
		if rec.ID != ids[i] {
			t.Fatalf("record %d is %s, want %s (ID order)", i, rec.ID, ids[i])
		}
		switch rec.Name {
		case "pi03":
			if !rec.Online || rec.Relay != "r1" || rec.Generation != 1 || len(rec.Leases) != 2 || len(rec.PublicKey) != 32 {
				t.Fatalf("online device's record: %+v", rec)
			}
		case "pi05":
			if !rec.Revoked {
				t.Fatal("revoked device not flagged")
			}
		}
	}
	// The default limit and a limit above the cap.
	if page, next, err := s.Snapshot(ctx, "", 0); err != nil || len(page) != 7 || next != "" {
		t.Fatalf("default page: %d records, next %q, %v", len(page), next, err)
	}
	if rec, err := s.Record(ctx, ids[0]); err != nil || rec.ID != ids[0] {
		t.Fatalf("record: %+v %v", rec, err)
	}
	_, err := s.Record(ctx, "dnope")
	wantKind(t, err, controlplane.KindNotFound)
}

func TestSync(t *testing.T) {
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), newClock())
	ctx := t.Context()
	connectOn := func(name, relay string, k []byte) uint64 {
		t.Helper()
		cr, err := s.Connect(ctx, controlplane.ConnectRequest{PublicKey: k, RelayID: relay})
		if err != nil {
			t.Fatal(err)
		}
		return cr.Generation
	}
	id := func(k []byte) string { return frames.DeviceID(k) }
	held := enrolled(t, s, "held")        // online on r1 at gen 1; r1 still holds it
	gone := enrolled(t, s, "gone")        // online on r1 at gen 1; r1 lost it
	moved := enrolled(t, s, "moved")      // r1 reports gen 1, but it is online on r2 at gen 2
	provisional := enrolled(t, s, "prov") // r1 admitted it with gen 2 while the control plane was away
	tie := enrolled(t, s, "tie")          // r1 reports gen 1, the same generation online on r2
	endedKey := enrolled(t, s, "ended")   // r1 reports gen 1; that generation ended on r2
	revoked := enrolled(t, s, "revoked")  // revoked meanwhile
	connectOn("held", "r1", held)
	connectOn("gone", "r1", gone)
	connectOn("moved", "r1", moved)
	connectOn("moved", "r2", moved)
	connectOn("prov", "r2", provisional)
	s.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: id(provisional), Generation: 1})
	connectOn("tie", "r2", tie)
	connectOn("ended", "r2", endedKey)
	s.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: id(endedKey), Generation: 1})
	if _, err := s.Revoke(ctx, "revoked"); err != nil {
		t.Fatal(err)
	}
	accepted, stale, err := s.Sync(ctx, "r1", []controlplane.SyncSession{
		{DeviceID: id(held), Generation: 1},
		{DeviceID: id(moved), Generation: 1},
		{DeviceID: id(provisional), Generation: 2},
		{DeviceID: id(provisional), Generation: 1}, // an older one of the same device: the newest counts
		{DeviceID: id(tie), Generation: 1},
		{DeviceID: id(endedKey), Generation: 1},
		{DeviceID: id(revoked), Generation: 7},
		{DeviceID: "dunknown", Generation: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{id(held): 1, id(provisional): 2, id(endedKey): 2}
	if len(accepted) != len(want) {
		t.Fatalf("accepted %+v, want %v", accepted, want)
	}
	for _, a := range accepted {
		if want[a.DeviceID] != a.Generation {
			t.Fatalf("accepted %+v, want %v", accepted, want)
		}
	}
	if len(stale) != 1 || stale[0].DeviceID != id(gone) {
		t.Fatalf("ended %+v, want only gone", stale)
	}
	check := func(name string, online bool, relay string, gen uint64) {
		t.Helper()
		d, err := s.Device(ctx, name)
		if err != nil || d.Online != online || d.Relay != relay || d.Generation != gen {
			t.Fatalf("%s: online %v relay %s gen %d, want %v %s %d (%v)", name, d.Online, d.Relay, d.Generation, online, relay, gen, err)
		}
	}
	check("held", true, "r1", 1)
	check("gone", false, "r1", 1)
	check("moved", true, "r2", 2)
	check("prov", true, "r1", 2)
	check("tie", true, "r2", 1)
	check("ended", true, "r1", 2)
	// The next session of a synced device is newer than the accepted one.
	if g := connectOn("prov", "r2", provisional); g != 3 {
		t.Fatalf("connect after a provisional generation 2: got %d, want 3", g)
	}
	// Syncing the same again changes nothing.
	again, none, err := s.Sync(ctx, "r1", []controlplane.SyncSession{{DeviceID: id(held), Generation: 1}, {DeviceID: id(endedKey), Generation: 2}})
	if err != nil || len(again) != 2 || len(none) != 0 {
		t.Fatalf("repeated sync: %+v %+v %v", again, none, err)
	}
}

// TestErrorsNameNoTokenHash: a damaged token record is reported by the
// token's ID, never by its hash (which enrolls over NATS).
func TestErrorsNameNoTokenHash(t *testing.T) {
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), newClock())
	tok := mustToken(t, s, 1, time.Hour)
	hash := controlplane.TokenHash(tok)
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTokens).Put([]byte(hash), []byte("{")) }); err != nil {
		t.Fatal(err)
	}
	_, err := s.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: hash, EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi01"}})
	if err == nil || strings.Contains(err.Error(), hash) || strings.Contains(err.Error(), tok) {
		t.Fatalf("enroll with a damaged token: %v", err)
	}
	_, err = s.Tokens(t.Context())
	if err == nil || strings.Contains(err.Error(), hash) {
		t.Fatalf("tokens with a damaged one: %v", err)
	}
}
