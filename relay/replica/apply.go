package replica

import (
	"bytes"
	"slices"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
)

// Result says what Apply did with a run of events.
type Result struct {
	// Applied counts the events applied, in order. An event of a kind this
	// build does not know, or a malformed one, counts as applied: its seq
	// is used, the data is unchanged (and the malformed one logged).
	Applied int
	// Ignored counts the events at or below the replica's seq: duplicates
	// and events older than its snapshot.
	Ignored int
	// NeedSnapshot is set when an event was neither the next one nor an
	// old one: a gap in seq, another epoch, no snapshot yet, or a snapshot
	// started and not finished. That event and those after it were not
	// applied: take a snapshot, then apply the events received since its
	// first page was asked for (those received before are in it).
	NeedSnapshot bool
}

// Apply applies device events in the order given, in one transaction: the
// records they change and the seq they bring the replica to are written
// together, then the in-memory indexes follow. An event is applied when it
// is the next one (same epoch, seq one above the replica's); Result says
// what became of the others. Passing the events waiting in the
// subscription's queue in one call shares one disk sync among them, which
// is what keeps a reconnect storm's session events cheap.
//
// What each kind does:
//   - enrolled: stores Device (a device already known keeps its leases,
//     presence and revocation);
//   - revoked: marks the device revoked and offline; its names stay its own;
//   - session: the device is online on RelayID with Generation, unless the
//     replica knows a newer generation;
//   - offline: the device is offline, if Generation is its current one;
//   - leases: Leases replaces the device's leases (names it no longer lists
//     are dropped from the lookups);
//   - relay-down: every device online on RelayID is offline.
//
// On error nothing was applied, neither on disk nor in memory.
func (r *Replica) Apply(events ...controlplane.DeviceEvent) (Result, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	var res Result
	if r.closed {
		return res, ErrClosed
	}
	r.mu.RLock()
	epoch, seq := r.epoch, r.seq
	r.mu.RUnlock()
	b := batch{base: r.st, changes: map[string]*device{}, r: r}
	for _, ev := range events {
		if epoch == "" || r.staging != nil || ev.Epoch != epoch || ev.Seq > seq+1 {
			if !r.resync {
				r.resync = true
				r.log.Info("device events: the replica needs a new snapshot", "epoch", epoch, "seq", seq,
					"snapshot_in_progress", r.staging != nil, "event_epoch", ev.Epoch, "event_seq", ev.Seq)
			}
			res.NeedSnapshot = true
			break
		}
		if ev.Seq <= seq {
			res.Ignored++
			continue
		}
		b.event(ev)
		seq = ev.Seq
		res.Applied++
	}
	if res.Applied == 0 {
		return res, nil
	}
	err := r.write(func(tx *bolt.Tx) error {
		bucket := tx.Bucket(bucketDevices)
		for id, d := range b.changes {
			if d == nil { // deleted
				if err := bucket.Delete([]byte(id)); err != nil {
					return err
				}
			} else if err := putDevice(bucket, d); err != nil {
				return err
			}
		}
		return putMeta(tx, epoch, seq)
	})
	if err != nil {
		return Result{}, err
	}
	r.mu.Lock()
	for id, d := range b.changes {
		r.st.set(id, d)
	}
	r.seq, r.lastApply = seq, r.now()
	r.mu.Unlock()
	return res, nil
}

// batch is the changes of a run of events on top of the current state.
// Only the writer reads base without the read lock: it is the only one
// that changes it.
type batch struct {
	base    *state
	changes map[string]*device
	r       *Replica
}

func (b *batch) get(id string) *device {
	if d, ok := b.changes[id]; ok {
		return d
	}
	return b.base.devices[id]
}

// event applies one event to the batch. A device skips an event its
// record already reflects (seq at or below its asOf: its snapshot page
// was read after the event).
func (b *batch) event(ev controlplane.DeviceEvent) {
	if ev.Kind == controlplane.EventRelayDown {
		b.relayDown(ev)
		return
	}
	if ev.Kind == controlplane.EventEnrolled {
		b.enrolled(ev)
		return
	}
	old := b.get(ev.DeviceID)
	if old == nil {
		if isKnownKind(ev.Kind) {
			b.r.log.Warn("device event for an unknown device", "kind", ev.Kind, "device", ev.DeviceID, "seq", ev.Seq)
		}
		return
	}
	if ev.Seq <= old.asOf {
		return
	}
	if ev.Kind == controlplane.EventDeleted {
		b.changes[ev.DeviceID] = nil // forgotten, with its names
		return
	}
	rec := old.rec
	switch ev.Kind {
	case controlplane.EventRevoked:
		rec.Revoked, rec.Online = true, false
	case controlplane.EventSession:
		if ev.Generation < rec.Generation {
			break // an older session: it ended already
		}
		rec.Online, rec.Relay, rec.Generation = true, ev.RelayID, ev.Generation
	case controlplane.EventOffline:
		if ev.Generation == rec.Generation {
			rec.Online = false
		}
	case controlplane.EventLeases:
		rec.Leases = ownLeases(ev.Leases, rec.ID)
	}
	b.changes[rec.ID] = &device{rec: rec, asOf: ev.Seq}
}

func (b *batch) enrolled(ev controlplane.DeviceEvent) {
	if ev.Device == nil || !validRecord(*ev.Device) || ev.DeviceID != "" && ev.DeviceID != ev.Device.ID {
		b.r.log.Warn("malformed enrolled event", "device", ev.DeviceID, "seq", ev.Seq)
		return
	}
	rec := cloneRecord(*ev.Device)
	if old := b.get(rec.ID); old != nil {
		if ev.Seq <= old.asOf {
			return
		}
		// Enrolling again changes the identity, never what the device holds.
		o := old.rec
		o.Name, o.PublicKey, o.Revoked = rec.Name, rec.PublicKey, o.Revoked || rec.Revoked
		rec = o
	}
	b.changes[rec.ID] = &device{rec: rec, asOf: ev.Seq}
}

func (b *batch) relayDown(ev controlplane.DeviceEvent) {
	down := func(d *device) {
		if d != nil && d.rec.Online && d.rec.Relay == ev.RelayID && ev.Seq > d.asOf {
			rec := d.rec
			rec.Online = false
			b.changes[rec.ID] = &device{rec: rec, asOf: ev.Seq}
		}
	}
	for id := range b.base.devices {
		down(b.get(id))
	}
	for id, d := range b.changes {
		if b.base.devices[id] == nil {
			down(d)
		}
	}
}

func isKnownKind(kind string) bool {
	switch kind {
	case controlplane.EventEnrolled, controlplane.EventRevoked, controlplane.EventSession,
		controlplane.EventOffline, controlplane.EventLeases, controlplane.EventRelayDown, controlplane.EventDeleted:
		return true
	}
	return false
}

// validRecord checks what the indexes rely on: an ID that is the key's.
func validRecord(rec controlplane.DeviceRecord) bool {
	return len(rec.PublicKey) > 0 && rec.ID == frames.DeviceID(rec.PublicKey)
}

// cloneRecord copies a record's slices, so the replica shares none with
// its caller.
func cloneRecord(rec controlplane.DeviceRecord) controlplane.DeviceRecord {
	rec.PublicKey = bytes.Clone(rec.PublicKey)
	rec.Leases = ownLeases(rec.Leases, rec.ID)
	return rec
}

// ownLeases copies leases and marks them as the device's.
func ownLeases(leases []controlplane.Lease, id string) []controlplane.Lease {
	leases = slices.Clone(leases)
	for i := range leases {
		leases[i].DeviceID = id
	}
	return leases
}
