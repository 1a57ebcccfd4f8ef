package replica

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

// mustOpen opens a replica at path, closed when the test ends.
func mustOpen(t testing.TB, path string) *Replica {
	t.Helper()
	r, err := Open(Config{Path: path, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func tempPath(t testing.TB) string { return filepath.Join(t.TempDir(), "relay.db") }

// key is a deterministic public key per name.
func key(name string) []byte { k := sha256.Sum256([]byte("key " + name)); return k[:] }

func id(name string) string { return frames.DeviceID(key(name)) }

// dev is the record of device name with leases.
func dev(name string, leases ...controlplane.Lease) controlplane.DeviceRecord {
	for i := range leases {
		leases[i].DeviceID, leases[i].DeviceName = id(name), name
	}
	return controlplane.DeviceRecord{ID: id(name), Name: name, PublicKey: key(name), Leases: leases}
}

func web(label string) controlplane.Lease {
	return controlplane.Lease{Hostname: label, Service: "web", Proto: controlplane.ProtoHTTP}
}

func ssh(port uint16) controlplane.Lease {
	return controlplane.Lease{Port: port, Service: "ssh", Proto: controlplane.ProtoTCP}
}

// snapshot applies recs as a snapshot of epoch at seq, in pages of size n.
func snapshot(t testing.TB, r *Replica, epoch string, seq uint64, n int, recs ...controlplane.DeviceRecord) {
	t.Helper()
	for i, page := range pages(epoch, seq, n, recs) {
		if err := r.ApplySnapshot(page, i == 0); err != nil {
			t.Fatalf("page %d: %v", i, err)
		}
	}
}

// pages splits recs into snapshot pages of n records, ordered by ID, as
// the control plane sends them.
func pages(epoch string, seq uint64, n int, recs []controlplane.DeviceRecord) []controlplane.SnapshotResponse {
	recs = slices.SortedFunc(slices.Values(recs), func(a, b controlplane.DeviceRecord) int { return strings.Compare(a.ID, b.ID) })
	var out []controlplane.SnapshotResponse
	for len(recs) > n {
		out = append(out, controlplane.SnapshotResponse{Epoch: epoch, Seq: seq, Devices: recs[:n], Next: recs[n-1].ID})
		recs = recs[n:]
	}
	return append(out, controlplane.SnapshotResponse{Epoch: epoch, Seq: seq, Devices: recs})
}

// apply applies events and wants them all applied.
func apply(t testing.TB, r *Replica, evs ...controlplane.DeviceEvent) {
	t.Helper()
	res, err := r.Apply(evs...)
	if err != nil || res != (Result{Applied: len(evs)}) {
		t.Fatalf("apply %+v: %+v, %v", evs, res, err)
	}
}

// events numbers events from seq+1 in epoch.
func events(epoch string, seq uint64, evs ...controlplane.DeviceEvent) []controlplane.DeviceEvent {
	for i := range evs {
		evs[i].Epoch, evs[i].Seq = epoch, seq+uint64(i)+1
	}
	return evs
}

func enrolled(rec controlplane.DeviceRecord) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventEnrolled, DeviceID: rec.ID, Device: &rec}
}

func revoked(name string) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventRevoked, DeviceID: id(name)}
}

func session(name string, gen uint64, relay string) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventSession, DeviceID: id(name), Generation: gen, RelayID: relay}
}

func offline(name string, gen uint64) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventOffline, DeviceID: id(name), Generation: gen}
}

func leases(name string, ls ...controlplane.Lease) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventLeases, DeviceID: id(name), Leases: ls}
}

func relayDown(relay string) controlplane.DeviceEvent {
	return controlplane.DeviceEvent{Kind: controlplane.EventRelayDown, RelayID: relay}
}

// wantHost checks who serves a hostname label ("" for nobody).
func wantHost(t testing.TB, r *Replica, label, name string) {
	t.Helper()
	rec, l, ok := r.ByHostname(label)
	wantServer(t, "hostname "+label, rec, l, ok && l.Hostname == label, name)
}

// wantPort checks who serves a TCP port ("" for nobody).
func wantPort(t testing.TB, r *Replica, port uint16, name string) {
	t.Helper()
	rec, l, ok := r.ByPort(port)
	wantServer(t, fmt.Sprint("port ", port), rec, l, ok && l.Port == port, name)
}

// wantServer checks a lookup's answer: device name with its lease, or
// nobody when name is "".
func wantServer(t testing.TB, what string, rec controlplane.DeviceRecord, l controlplane.Lease, ok bool, name string) {
	t.Helper()
	switch {
	case name == "" && ok:
		t.Fatalf("%s: served by %s, want nobody", what, rec.Name)
	case name == "":
	case !ok:
		t.Fatalf("%s: nobody, want %s", what, name)
	case rec.Name != name || l.DeviceID != rec.ID || l.DeviceName != name:
		t.Fatalf("%s: %s with lease %+v, want %s", what, rec.Name, l, name)
	}
}

func wantPorts(t testing.TB, r *Replica, want ...uint16) {
	t.Helper()
	if got := r.Ports(); !slices.Equal(got, want) && len(got)+len(want) > 0 {
		t.Fatalf("ports %v, want %v", got, want)
	}
}

func wantEpoch(t testing.TB, r *Replica, epoch string, seq uint64) {
	t.Helper()
	if e, s := r.Epoch(); e != epoch || s != seq {
		t.Fatalf("epoch %q seq %d, want %q %d", e, s, epoch, seq)
	}
}

func mustDevice(t testing.TB, r *Replica, name string) controlplane.DeviceRecord {
	t.Helper()
	rec, ok := r.Device(id(name))
	if !ok {
		t.Fatalf("device %s unknown", name)
	}
	return rec
}

func TestSnapshotThenEvents(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	wantEpoch(t, r, "", 0)
	snapshot(t, r, "e1", 10, 2,
		dev("pi01", web("web-pi01"), ssh(20001)),
		dev("pi02", web("web-pi02")),
		dev("pi03", ssh(20003)),
		dev("pi04"),
		dev("pi05", web("cam-pi05"), web("web-pi05")),
	)
	wantEpoch(t, r, "e1", 10)
	wantHost(t, r, "web-pi01", "pi01")
	wantHost(t, r, "cam-pi05", "pi05")
	wantHost(t, r, "web-pi05", "pi05")
	wantHost(t, r, "nope", "")
	wantPort(t, r, 20003, "pi03")
	wantPorts(t, r, 20001, 20003)

	apply(t, r, events("e1", 10,
		enrolled(dev("pi06")),
		leases("pi06", web("web-pi06"), ssh(20006)),
		session("pi06", 1, "relay-a"),
		session("pi01", 1, "relay-b"),
		offline("pi01", 1),
		revoked("pi02"),
	)...)
	wantEpoch(t, r, "e1", 16)
	wantHost(t, r, "web-pi06", "pi06")
	wantPort(t, r, 20006, "pi06")
	wantPorts(t, r, 20001, 20003, 20006)
	if d := mustDevice(t, r, "pi06"); !d.Online || d.Relay != "relay-a" || d.Generation != 1 {
		t.Fatalf("pi06 %+v", d)
	}
	if d := mustDevice(t, r, "pi01"); d.Online || d.Generation != 1 {
		t.Fatalf("pi01 %+v", d)
	}
	// A revoked device keeps its names: the caller sees it and refuses.
	if rec, _, ok := r.ByHostname("web-pi02"); !ok || !rec.Revoked {
		t.Fatalf("web-pi02: %+v %v", rec, ok)
	}
	_, l, _ := r.ByHostname("web-pi06")
	if !l.Online || l.Relay != "relay-a" || l.Generation != 1 {
		t.Fatalf("lease presence not filled in: %+v", l)
	}
	st := r.Stats()
	if st.Devices != 6 || st.Revoked != 1 || st.Online != 1 || st.Hostnames != 5 || st.Ports != 3 ||
		st.Epoch != "e1" || st.Seq != 16 || st.LastApply.IsZero() {
		t.Fatalf("stats %+v", st)
	}

	// A new snapshot replaces everything: devices missing from it are gone.
	snapshot(t, r, "e2", 3, 2, dev("pi01", web("web-pi01")), dev("pi07", ssh(20007)))
	wantEpoch(t, r, "e2", 3)
	if _, ok := r.Device(id("pi06")); ok {
		t.Fatal("pi06 survived a snapshot without it")
	}
	wantHost(t, r, "web-pi06", "")
	wantPort(t, r, 20007, "pi07")
	wantPorts(t, r, 20007)
}

func TestApplyOrder(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	ev := func(epoch string, seq uint64) controlplane.DeviceEvent {
		e := session("pi01", seq, "relay-a")
		e.Epoch, e.Seq = epoch, seq
		return e
	}
	if res, err := r.Apply(ev("e1", 1)); err != nil || !res.NeedSnapshot || res.Applied != 0 {
		t.Fatalf("before any snapshot: %+v %v", res, err)
	}
	snapshot(t, r, "e1", 5, 10, dev("pi01"))

	tests := []struct {
		name   string
		evs    []controlplane.DeviceEvent
		want   Result
		seq    uint64 // the replica's seq after
		online uint64 // pi01's generation after
	}{
		{"next", []controlplane.DeviceEvent{ev("e1", 6)}, Result{Applied: 1}, 6, 6},
		{"duplicate", []controlplane.DeviceEvent{ev("e1", 6)}, Result{Ignored: 1}, 6, 6},
		{"old", []controlplane.DeviceEvent{ev("e1", 2)}, Result{Ignored: 1}, 6, 6},
		{"gap", []controlplane.DeviceEvent{ev("e1", 8)}, Result{NeedSnapshot: true}, 6, 6},
		{"new epoch", []controlplane.DeviceEvent{ev("e2", 1)}, Result{NeedSnapshot: true}, 6, 6},
		{"run", []controlplane.DeviceEvent{ev("e1", 5), ev("e1", 7), ev("e1", 8)}, Result{Applied: 2, Ignored: 1}, 8, 8},
		{"gap midway", []controlplane.DeviceEvent{ev("e1", 9), ev("e1", 11), ev("e1", 10)}, Result{Applied: 1, NeedSnapshot: true}, 9, 9},
		{"empty", nil, Result{}, 9, 9},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := r.Apply(tt.evs...)
			if err != nil || res != tt.want {
				t.Fatalf("got %+v %v, want %+v", res, err, tt.want)
			}
			wantEpoch(t, r, "e1", tt.seq)
			if g := mustDevice(t, r, "pi01").Generation; g != tt.online {
				t.Fatalf("generation %d, want %d", g, tt.online)
			}
		})
	}

	// Between the first and the last page, events wait for the snapshot.
	ps := pages("e2", 1, 1, []controlplane.DeviceRecord{dev("pi01"), dev("pi02")})
	if err := r.ApplySnapshot(ps[0], true); err != nil {
		t.Fatal(err)
	}
	if res, err := r.Apply(ev("e1", 10)); err != nil || !res.NeedSnapshot {
		t.Fatalf("during a snapshot: %+v %v", res, err)
	}
	if err := r.ApplySnapshot(ps[1], false); err != nil {
		t.Fatal(err)
	}
	apply(t, r, ev("e2", 2))
	wantEpoch(t, r, "e2", 2)
}

// TestPagesAtDifferentSeqs: pages read at different seqs add up to the
// control plane's state once the events after the first page are applied:
// each device skips the events its page reflects, so it never goes back to
// an older state meanwhile, and a name two pages both list is served by the
// newer one.
func TestPagesAtDifferentSeqs(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	// The control plane at seq 100: a holds "web" and port 1; b is online
	// on r1 (generation 1). Then:
	evs := events("e", 100,
		relayDown("r1"),                 // 101
		leases("a"),                     // 102: a releases its names
		leases("b", web("old-b")),       // 103
		leases("b", web("web"), ssh(1)), // 104: b takes a's names
		session("b", 2, "r1"),           // 105
		session("a", 7, "r2"),           // 106
	)
	// Page 1 (a) is read at seq 100, page 2 (b) at seq 105.
	a := dev("a", web("web"), ssh(1))
	b := dev("b", web("web"), ssh(1))
	b.Online, b.Relay, b.Generation = true, "r1", 2
	if err := r.ApplySnapshot(controlplane.SnapshotResponse{Epoch: "e", Seq: 100, Devices: []controlplane.DeviceRecord{a}, Next: "more"}, true); err != nil {
		t.Fatal(err)
	}
	if err := r.ApplySnapshot(controlplane.SnapshotResponse{Epoch: "e", Seq: 105, Devices: []controlplane.DeviceRecord{b}}, false); err != nil {
		t.Fatal(err)
	}
	wantEpoch(t, r, "e", 100)
	check := func() {
		t.Helper()
		if d := mustDevice(t, r, "b"); !d.Online || d.Generation != 2 {
			t.Fatalf("b went back to an older state: %+v", d)
		}
		wantHost(t, r, "web", "b") // b's page is newer than a's
		wantHost(t, r, "old-b", "")
		wantPort(t, r, 1, "b")
		wantPorts(t, r, 1)
		checkInvariants(t, r)
	}
	check()
	for _, ev := range evs {
		apply(t, r, ev)
		check()
	}
	if d := mustDevice(t, r, "a"); !d.Online || d.Generation != 7 || len(d.Leases) != 0 {
		t.Fatalf("a %+v", d)
	}
}

func TestLeaseChangesMoveNames(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a"), ssh(20001)), dev("b"))
	apply(t, r, events("e", 0, leases("a", web("web2-a"), ssh(20002)))...)
	wantHost(t, r, "web-a", "")
	wantHost(t, r, "web2-a", "a")
	wantPort(t, r, 20001, "")
	wantPort(t, r, 20002, "a")
	wantPorts(t, r, 20002)
	// a releases its names and b takes them.
	apply(t, r, events("e", 1, leases("a"), leases("b", web("web2-a"), ssh(20002)))...)
	wantHost(t, r, "web2-a", "b")
	wantPort(t, r, 20002, "b")
	if d := mustDevice(t, r, "a"); len(d.Leases) != 0 {
		t.Fatalf("a kept %+v", d.Leases)
	}
	apply(t, r, events("e", 3, leases("b"))...)
	wantHost(t, r, "web2-a", "")
	wantPorts(t, r)
	if st := r.Stats(); st.Hostnames != 0 || st.Ports != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestPresence(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	snapshot(t, r, "e", 0, 10, dev("a"), dev("b"), dev("c"), dev("d"))
	apply(t, r, events("e", 0,
		session("a", 3, "r1"),
		session("b", 1, "r1"),
		session("c", 2, "r2"),
		session("a", 2, "r2"), // older than 3: ignored
		offline("b", 0),       // not b's generation: ignored
		relayDown("r1"),
		session("d", 1, "r1"), // after the relay-down
	)...)
	want := map[string]struct {
		online bool
		relay  string
		gen    uint64
	}{
		"a": {false, "r1", 3},
		"b": {false, "r1", 1},
		"c": {true, "r2", 2},
		"d": {true, "r1", 1},
	}
	for name, w := range want {
		if d := mustDevice(t, r, name); d.Online != w.online || d.Relay != w.relay || d.Generation != w.gen {
			t.Errorf("%s: online %v on %q gen %d, want %+v", name, d.Online, d.Relay, d.Generation, w)
		}
	}
	if st := r.Stats(); st.Online != 2 {
		t.Fatalf("stats %+v", st)
	}
	apply(t, r, events("e", 7, offline("c", 2), revoked("d"))...)
	if st := r.Stats(); st.Online != 0 || st.Revoked != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestEnrolledAgain: an enrolled event for a known device changes its
// identity, never what it holds or a revocation; a malformed one uses its
// seq and changes nothing.
func TestEnrolledAgain(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a")))
	renamed := dev("a")
	renamed.Name = "a2"
	bad := dev("x")
	bad.ID = id("y") // not its key's ID
	apply(t, r, events("e", 0,
		revoked("a"),
		enrolled(renamed),
		enrolled(bad),
		controlplane.DeviceEvent{Kind: controlplane.EventEnrolled},
		controlplane.DeviceEvent{Kind: "future-kind", DeviceID: id("a")},
		leases("nobody", web("web-nobody")),
	)...)
	d := mustDevice(t, r, "a")
	if d.Name != "a2" || !d.Revoked || len(d.Leases) != 1 {
		t.Fatalf("a %+v", d)
	}
	if st := r.Stats(); st.Devices != 1 || st.Hostnames != 1 {
		t.Fatalf("stats %+v", st)
	}
	wantEpoch(t, r, "e", 6)
}

// TestPagedSnapshotIsAllOrNothing: a snapshot stopped after some pages (a
// crash, NATS gone) leaves the previous data served and on disk.
func TestPagedSnapshotIsAllOrNothing(t *testing.T) {
	path := tempPath(t)
	r := mustOpen(t, path)
	old := []controlplane.DeviceRecord{dev("a", web("web-a")), dev("b", ssh(20002)), dev("c")}
	snapshot(t, r, "e1", 4, 2, old...)
	apply(t, r, events("e1", 4, session("a", 1, "r1"))...)
	check := func(r *Replica) {
		t.Helper()
		wantEpoch(t, r, "e1", 5)
		wantHost(t, r, "web-a", "a")
		wantPort(t, r, 20002, "b")
		wantHost(t, r, "web-x", "")
		if st := r.Stats(); st.Devices != 3 || st.Online != 1 {
			t.Fatalf("stats %+v", st)
		}
	}

	var recs []controlplane.DeviceRecord
	for i := range 7 {
		recs = append(recs, dev(fmt.Sprint("x", i), web(fmt.Sprint("web-x", i))))
	}
	ps := pages("e2", 1, 3, recs)
	for i, p := range ps[:2] {
		if err := r.ApplySnapshot(p, i == 0); err != nil {
			t.Fatal(err)
		}
	}
	check(r) // served meanwhile

	// A page of another epoch drops the snapshot.
	other := ps[2]
	other.Epoch = "e3"
	if err := r.ApplySnapshot(other, false); !errors.Is(err, ErrEpochChanged) {
		t.Fatalf("page of another epoch: %v", err)
	}
	if err := r.ApplySnapshot(ps[2], false); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("page after a dropped snapshot: %v", err)
	}
	check(r)

	// Stop after two pages, close, reopen: the old data, no snapshot in progress.
	for i, p := range ps[:2] {
		if err := r.ApplySnapshot(p, i == 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r = mustOpen(t, path)
	check(r)
	if err := r.ApplySnapshot(ps[2], false); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("last page after a reopen: %v", err)
	}
	check(r)

	// Starting again from the first page completes.
	snapshot(t, r, "e2", 1, 3, recs...)
	wantEpoch(t, r, "e2", 1)
	wantHost(t, r, "web-a", "")
	wantHost(t, r, "web-x6", "x6")
	if err := r.check(); err != nil {
		t.Fatal(err)
	}
}

func TestReopenRestoresIndexes(t *testing.T) {
	path := tempPath(t)
	r := mustOpen(t, path)
	snapshot(t, r, "e", 9, 2, dev("a", web("web-a"), ssh(20001)), dev("b", web("web-b")), dev("c"))
	apply(t, r, events("e", 9,
		session("a", 4, "r1"),
		revoked("c"),
		leases("b", web("web-b"), ssh(20002)),
		enrolled(dev("d", web("web-d"))),
	)...)
	if _, _, err := r.Admit(key("a")); err != nil {
		t.Fatal(err)
	}
	before := dump(r)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := r.ByHostname("web-a"); !ok {
		t.Fatal("lookups stopped at Close")
	}
	if _, err := r.Apply(events("e", 13, session("b", 1, "r1"))...); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close: %v", err)
	}
	if _, _, err := r.Admit(key("a")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Admit after Close: %v", err)
	}
	r = mustOpen(t, path)
	if after := dump(r); after != before {
		t.Fatalf("after reopen:\n%s\nbefore:\n%s", after, before)
	}
	checkInvariants(t, r)
}

// dump renders everything a replica answers, for comparisons.
func dump(r *Replica) string {
	var b strings.Builder
	e, s := r.Epoch()
	fmt.Fprintf(&b, "epoch %s seq %d ports %v\n", e, s, r.Ports())
	r.mu.RLock()
	ids := slices.Sorted(func(yield func(string) bool) {
		for id := range r.st.devices {
			if !yield(id) {
				return
			}
		}
	})
	hosts := slices.Sorted(func(yield func(string) bool) {
		for h := range r.st.hosts {
			if !yield(h) {
				return
			}
		}
	})
	prov := fmt.Sprint(r.prov)
	r.mu.RUnlock()
	for _, id := range ids {
		d, _ := r.Device(id)
		fmt.Fprintf(&b, "%+v\n", d)
	}
	for _, h := range hosts {
		d, l, ok := r.ByHostname(h)
		fmt.Fprintf(&b, "%s → %s %+v %v\n", h, d.ID, l, ok)
	}
	for _, p := range r.Ports() {
		d, l, ok := r.ByPort(p)
		fmt.Fprintf(&b, "%d → %s %+v %v\n", p, d.ID, l, ok)
	}
	st := r.Stats()
	st.LastApply = time.Time{}
	fmt.Fprintf(&b, "provisional %s\nstats %+v\n", prov, st)
	return b.String()
}

func TestAdmit(t *testing.T) {
	path := tempPath(t)
	r := mustOpen(t, path)
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a")), dev("b"))
	apply(t, r, events("e", 0, session("a", 5, "r1"), revoked("b"))...)

	_, _, err := r.Admit(key("stranger"))
	if !errors.Is(err, ErrUnknownKey) || controlplane.KindOf(err) != controlplane.KindUnauthorized {
		t.Fatalf("unknown key: %v", err)
	}
	_, _, err = r.Admit(key("b"))
	if !errors.Is(err, ErrRevoked) || controlplane.KindOf(err) != controlplane.KindRevoked {
		t.Fatalf("revoked: %v", err)
	}
	rec, gen, err := r.Admit(key("a"))
	if err != nil || gen != 6 || rec.ID != id("a") || len(rec.Leases) != 1 || rec.Leases[0].Hostname != "web-a" {
		t.Fatalf("admit a: %+v gen %d %v", rec, gen, err)
	}
	if _, gen, _ = r.Admit(key("a")); gen != 7 {
		t.Fatalf("second admission: gen %d, want 7", gen)
	}

	// The bump is on disk.
	r.Close()
	r = mustOpen(t, path)
	if _, gen, _ = r.Admit(key("a")); gen != 8 {
		t.Fatalf("admission after a reopen: gen %d, want 8", gen)
	}
	// A newer session from the control plane raises the floor; an older one does not lower it.
	apply(t, r, events("e", 2, session("a", 20, "r2"))...)
	if _, gen, _ = r.Admit(key("a")); gen != 21 {
		t.Fatalf("after session 20: gen %d, want 21", gen)
	}
	// A snapshot does not forget the provisional generations.
	snapshot(t, r, "e2", 0, 10, dev("a"))
	if _, gen, _ = r.Admit(key("a")); gen != 22 {
		t.Fatalf("after a snapshot: gen %d, want 22", gen)
	}

	// Concurrent admissions (a reconnect storm) share transactions and never share a generation.
	const n = 32
	gens := make([]uint64, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, g, err := r.Admit(key("a"))
			if err != nil {
				t.Error(err)
			}
			gens[i] = g
		})
	}
	wg.Wait()
	slices.Sort(gens)
	for i, g := range gens {
		if g != 23+uint64(i) {
			t.Fatalf("concurrent generations %v", gens)
		}
	}
}

// TestRevokeNotice: a revocation notice holds before the control plane's
// event arrives, across a reopen and across a snapshot that does not
// know it yet.
func TestRevokeNotice(t *testing.T) {
	path := tempPath(t)
	r := mustOpen(t, path)
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a")))
	apply(t, r, events("e", 0, session("a", 5, "r1"))...)
	if err := r.Revoke(id("a")); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		if _, _, err := r.Admit(key("a")); !errors.Is(err, ErrRevoked) {
			t.Fatalf("%s: admit: %v", when, err)
		}
		if rec, ok := r.Device(id("a")); !ok || !rec.Revoked || rec.Online {
			t.Fatalf("%s: device %+v %v", when, rec, ok)
		}
		if rec, lease, ok := r.ByHostname("web-a"); !ok || !rec.Revoked || lease.Online {
			t.Fatalf("%s: by hostname %+v %+v %v", when, rec, lease, ok)
		}
	}
	check("after the notice")
	r.Close()
	r = mustOpen(t, path)
	check("after a reopen")
	snapshot(t, r, "e2", 0, 10, dev("a", web("web-a")))
	check("after a snapshot from before the revocation")
	if err := r.Revoke(id("a")); err != nil {
		t.Fatalf("a second notice: %v", err)
	}
	r.Close()
	if err := r.Revoke(id("b")); !errors.Is(err, ErrClosed) {
		t.Fatalf("revoke on a closed replica: %v", err)
	}
}

func TestSecondOpenFailsFast(t *testing.T) {
	path := tempPath(t)
	mustOpen(t, path)
	start := time.Now()
	_, err := Open(Config{Path: path, LockTimeout: 100 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("second open: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("second open took %v", d)
	}
	if _, err := Open(Config{}); err == nil {
		t.Fatal("Open without a Path succeeded")
	}
}

func TestLookupsDoNotAllocate(t *testing.T) {
	r := mustOpen(t, tempPath(t))
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a"), ssh(20001)))
	a := id("a")
	allocs := testing.AllocsPerRun(100, func() {
		r.Device(a)
		r.ByHostname("web-a")
		r.ByHostname("unknown")
		r.ByPort(20001)
		r.Epoch()
	})
	if allocs != 0 {
		t.Fatalf("lookups allocate %v times", allocs)
	}
}

// checkInvariants checks the indexes against the records: every index entry
// names devices that list the name, its first one is what lookups serve,
// every name a device lists is indexed, and the counts add up.
func checkInvariants(t testing.TB, r *Replica) {
	t.Helper()
	r.mu.RLock()
	defer r.mu.RUnlock()
	s := r.st
	lists := func(d *device, host string, port uint16) bool {
		return d != nil && slices.ContainsFunc(d.rec.Leases, func(l controlplane.Lease) bool {
			return host != "" && l.Hostname == host || port != 0 && l.Port == port
		})
	}
	for h, ids := range s.hosts {
		if len(ids) == 0 || h == "" {
			t.Fatalf("hostname %q indexed with holders %v", h, ids)
		}
		for _, id := range ids {
			if !lists(s.devices[id], h, 0) {
				t.Fatalf("hostname %s indexed to %s, which does not list it", h, id)
			}
			if newer(s.devices[id], s.devices[ids[0]]) {
				t.Fatalf("hostname %s served by %s, but %s has newer information", h, ids[0], id)
			}
		}
		if len(slices.Compact(slices.Sorted(slices.Values(ids)))) != len(ids) {
			t.Fatalf("hostname %s: a holder twice in %v", h, ids)
		}
	}
	for p, ids := range s.ports {
		if len(ids) == 0 || p == 0 {
			t.Fatalf("port %d indexed with holders %v", p, ids)
		}
		for _, id := range ids {
			if !lists(s.devices[id], "", p) {
				t.Fatalf("port %d indexed to %s, which does not list it", p, id)
			}
			if newer(s.devices[id], s.devices[ids[0]]) {
				t.Fatalf("port %d served by %s, but %s has newer information", p, ids[0], id)
			}
		}
		if len(slices.Compact(slices.Sorted(slices.Values(ids)))) != len(ids) {
			t.Fatalf("port %d: a holder twice in %v", p, ids)
		}
	}
	online, revoked := 0, 0
	for id, d := range s.devices {
		if d.rec.ID != id || s.byKey[string(d.rec.PublicKey)] != id {
			t.Fatalf("device %s: record %s, key index %s", id, d.rec.ID, s.byKey[string(d.rec.PublicKey)])
		}
		for _, l := range d.rec.Leases {
			if l.Hostname != "" && !slices.Contains(s.hosts[l.Hostname], id) {
				t.Fatalf("device %s lists hostname %s, not indexed to it", id, l.Hostname)
			}
			if l.Port != 0 && !slices.Contains(s.ports[l.Port], id) {
				t.Fatalf("device %s lists port %d, not indexed to it", id, l.Port)
			}
			if l.DeviceID != id {
				t.Fatalf("device %s holds a lease of %s", id, l.DeviceID)
			}
		}
		if d.rec.Online {
			online++
		}
		if d.rec.Revoked {
			revoked++
		}
	}
	if len(s.byKey) != len(s.devices) || online != s.online || revoked != s.revoked {
		t.Fatalf("counts: %d keys for %d devices; online %d, counted %d; revoked %d, counted %d",
			len(s.byKey), len(s.devices), online, s.online, revoked, s.revoked)
	}
}

// newer says whether a should serve a name both list rather than b.
func newer(a, b *device) bool {
	return a.asOf > b.asOf || a.asOf == b.asOf && a.rec.ID < b.rec.ID
}

// TestDeleted: a deleted device is forgotten with its names, on disk too;
// a replacement that took them holds them.
func TestDeleted(t *testing.T) {
	path := tempPath(t)
	r := mustOpen(t, path)
	snapshot(t, r, "e", 0, 10, dev("a", web("web-a")), dev("b"))
	apply(t, r, events("e", 0, revoked("a"), controlplane.DeviceEvent{Kind: controlplane.EventDeleted, DeviceID: id("a")},
		controlplane.DeviceEvent{Kind: controlplane.EventRelayDown, RelayID: "r1"})...)
	if _, ok := r.Device(id("a")); ok {
		t.Fatal("a deleted device is still known")
	}
	if _, _, ok := r.ByHostname("web-a"); ok {
		t.Fatal("a deleted device's name still routes")
	}
	repl := dev("c", web("web-a"))
	apply(t, r, events("e", 3, controlplane.DeviceEvent{Kind: controlplane.EventEnrolled, DeviceID: repl.ID, Device: &repl})...)
	r.Close()
	r = mustOpen(t, path)
	if _, ok := r.Device(id("a")); ok {
		t.Fatal("a deleted device is back after a reopen")
	}
	if rec, _, ok := r.ByHostname("web-a"); !ok || rec.ID != id("c") {
		t.Fatalf("web-a after the replacement: %+v %v", rec, ok)
	}
}
