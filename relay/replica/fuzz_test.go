package replica

import (
	"errors"
	"log/slog"
	"testing"

	"github.com/tetherfleet/tether/controlplane"
)

// FuzzApply drives a replica with arbitrary runs of snapshots (finished or
// not, pages at different seqs), events (next, duplicate, gap, other epoch;
// names given to two devices at once, which a control plane never does)
// and admissions. After each step the indexes must agree with the records
// (checkInvariants) and Apply's Result with the seq; at the end a reopened
// replica must answer exactly as the one that wrote the file.
func FuzzApply(f *testing.F) {
	f.Add([]byte{0, 0, 0x0f, 1, 0, 0, 5, 1, 0x01, 3, 2, 0x07, 6, 0, 0, 7, 1, 0})
	f.Add([]byte{0, 3, 0x1f, 5, 0x31, 0, 5, 0x12, 0, 2, 0x21, 0x80, 6, 1, 0, 4, 0, 0x40})
	f.Add([]byte{0, 0, 0x8f, 1, 0, 0, 0, 1, 0x0f, 1, 0, 0xc0, 7, 0x80, 0, 7, 2, 0})
	f.Add([]byte{0, 2, 0x4f, 5, 0x10, 0, 5, 0x21, 0, 5, 0x32, 0, 3, 0, 1, 4, 0, 1, 6, 0, 0, 0, 5, 0x0f})
	f.Fuzz(func(t *testing.T, data []byte) {
		path := tempPath(t)
		r, err := Open(Config{Path: path, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		data = data[:min(len(data), 3*100)] // 100 steps: each one syncs the disk
		for len(data) >= 3 {
			op, x, y := data[0], data[1], data[2]
			data = data[3:]
			switch op % 8 {
			case 0:
				fuzzSnapshot(t, r, x, y)
			case 7:
				name := fuzzNames[x%4]
				if x&0x80 != 0 {
					name = "stranger"
				}
				r.mu.RLock()
				d := r.st.devices[id(name)]
				r.mu.RUnlock()
				_, _, err := r.Admit(key(name))
				switch {
				case d == nil && !errors.Is(err, ErrUnknownKey),
					d != nil && d.rec.Revoked && !errors.Is(err, ErrRevoked),
					d != nil && !d.rec.Revoked && err != nil:
					t.Fatalf("admit %s (%+v): %v", name, d, err)
				}
			default:
				fuzzEvent(t, r, op, x, y)
			}
			checkInvariants(t, r)
		}
		before := dump(r)
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		r = mustOpen(t, path)
		if err := r.check(); err != nil {
			t.Fatal(err)
		}
		if after := dump(r); after != before {
			t.Fatalf("after reopen:\n%s\nbefore:\n%s", after, before)
		}
		checkInvariants(t, r)
	})
}

var (
	fuzzNames  = []string{"a", "b", "c", "d"}
	fuzzHosts  = []string{"h1", "h2", "h3"}
	fuzzRelays = []string{"r1", "r2"}
	fuzzEpochs = []string{"e1", "e2"}
	fuzzKinds  = []string{
		controlplane.EventEnrolled, controlplane.EventRevoked, controlplane.EventSession,
		controlplane.EventOffline, controlplane.EventLeases, controlplane.EventRelayDown,
		"unknown-kind",
	}
)

// fuzzLeases makes the leases a byte describes: a hostname, a port, both or none.
func fuzzLeases(b byte) []controlplane.Lease {
	var ls []controlplane.Lease
	if b&1 != 0 {
		ls = append(ls, web(fuzzHosts[(b>>2)%3]))
	}
	if b&2 != 0 {
		ls = append(ls, ssh(uint16(1+(b>>4)%3)))
	}
	return ls
}

// fuzzSnapshot: x picks the epoch (bit 0), the first page's seq (bits 1-3)
// and the leases (bits 4-7, shifted per device); y picks the devices (bits
// 0-3), how much later the second page is read (bits 4-5), whether the
// snapshot stops after its first page (bit 7) and whether that page is
// marked first (bit 6 clear; when set, the page continues whatever
// snapshot is in progress).
func fuzzSnapshot(t *testing.T, r *Replica, x, y byte) {
	epoch, seq := fuzzEpochs[x&1], uint64(x>>1&7)
	var recs []controlplane.DeviceRecord
	for i, name := range fuzzNames {
		if y&(1<<i) != 0 {
			rec := dev(name, fuzzLeases(x>>4+byte(i))...)
			rec.Online, rec.Relay, rec.Generation = i%2 == 0, fuzzRelays[i%2], uint64(i)
			rec.Revoked = i == 3 && x&0x80 != 0
			recs = append(recs, rec)
		}
	}
	half := len(recs) / 2
	p1 := controlplane.SnapshotResponse{Epoch: epoch, Seq: seq, Devices: recs[:half], Next: "more"}
	p2 := controlplane.SnapshotResponse{Epoch: epoch, Seq: seq + uint64(y>>4&3), Devices: recs[half:]}
	want := seq
	if y&0x40 != 0 {
		r.wmu.Lock()
		if r.staging != nil {
			want = min(want, r.staging.seq)
		}
		r.wmu.Unlock()
	}
	err := r.ApplySnapshot(p1, y&0x40 == 0)
	if y&0x40 != 0 && err != nil && !errors.Is(err, ErrNoSnapshot) && !errors.Is(err, ErrEpochChanged) {
		t.Fatalf("page without a first: %v", err)
	}
	if err != nil || y&0x80 != 0 {
		return
	}
	if err := r.ApplySnapshot(p2, false); err != nil {
		t.Fatalf("last page: %v", err)
	}
	if e, s := r.Epoch(); e != epoch || s != want {
		t.Fatalf("after a snapshot of %s at %d: %s %d", epoch, seq, e, s)
	}
}

// fuzzEvent: op picks the kind; x the device (bits 0-1), the relay (bit
// 2), the leases (bits 3-7); y the generation (bits 0-2), the epoch (bit 5:
// the other one) and the seq (bits 6-7: next, next, duplicate, gap).
func fuzzEvent(t *testing.T, r *Replica, op, x, y byte) {
	epoch, seq := r.Epoch()
	r.wmu.Lock()
	staging := r.staging != nil
	r.wmu.Unlock()
	name := fuzzNames[x%4]
	ev := controlplane.DeviceEvent{
		Epoch: epoch, Seq: seq + 1, Kind: fuzzKinds[(op%8-1+op/8)%7], DeviceID: id(name),
		Generation: uint64(y & 7), RelayID: fuzzRelays[x>>2&1], Leases: fuzzLeases(x >> 3),
	}
	if ev.Kind == controlplane.EventEnrolled {
		rec := dev(name, fuzzLeases(x>>3)...)
		ev.Device = &rec
	}
	if y&0x20 != 0 {
		ev.Epoch = fuzzEpochs[0]
		if epoch == fuzzEpochs[0] {
			ev.Epoch = fuzzEpochs[1]
		}
	}
	switch y >> 6 {
	case 2:
		ev.Seq = seq
	case 3:
		ev.Seq = seq + 2
	}
	res, err := r.Apply(ev)
	if err != nil {
		t.Fatal(err)
	}
	var want Result
	switch {
	case epoch == "" || staging || ev.Epoch != epoch || ev.Seq > seq+1:
		want.NeedSnapshot = true
	case ev.Seq <= seq:
		want.Ignored = 1
	default:
		want.Applied = 1
	}
	if res != want {
		t.Fatalf("event %+v at %s %d (snapshot in progress: %v): %+v, want %+v", ev, epoch, seq, staging, res, want)
	}
	if e, s := r.Epoch(); res.Applied == 1 && (e != epoch || s != seq+1) || res.Applied == 0 && s != seq {
		t.Fatalf("event %+v moved the replica from %d to %d", ev, seq, s)
	}
}
