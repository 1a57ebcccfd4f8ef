package replica

import (
	"errors"
	"maps"
	"slices"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
)

// staging collects a snapshot's pages in memory until the last one.
type staging struct {
	epoch   string
	seq     uint64 // the lowest page's seq: the replica's seq once swapped in
	devices map[string]*device
	skipped int // malformed records
}

// ApplySnapshot takes one page of a snapshot (controlplane.SubjectSnapshot);
// first marks the page asked for with no After, which starts a new snapshot
// and drops one left unfinished. The last page is the one with no Next: with
// it, in one transaction, the snapshot replaces the replica's data (devices
// missing from it are removed) and its epoch and seq. Until then the pages
// wait in memory and the replica keeps serving its previous data, also after
// a crash: a snapshot is used whole or not at all.
//
// Each page is the state as of its own seq, and the replica's seq becomes
// the lowest of them; the events after it are applied on top (Apply), each
// device skipping those its page already reflects.
//
// A page of another epoch than the first drops the snapshot
// (ErrEpochChanged); a page with first=false and no snapshot in progress
// fails with ErrNoSnapshot. In both cases, start again from the first page.
func (r *Replica) ApplySnapshot(page controlplane.SnapshotResponse, first bool) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if page.Epoch == "" {
		r.staging = nil
		return errors.New("replica: snapshot page without an epoch")
	}
	if first {
		r.staging = &staging{epoch: page.Epoch, seq: page.Seq, devices: map[string]*device{}}
	}
	st := r.staging
	switch {
	case st == nil:
		return ErrNoSnapshot
	case page.Epoch != st.epoch:
		r.staging = nil
		return ErrEpochChanged
	}
	st.seq = min(st.seq, page.Seq)
	for _, rec := range page.Devices {
		if !validRecord(rec) {
			st.skipped++
			continue
		}
		st.devices[rec.ID] = &device{rec: cloneRecord(rec), asOf: page.Seq}
	}
	if page.Next != "" {
		return nil
	}
	r.staging = nil
	err := r.write(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketDevices); err != nil {
			return err
		}
		b, err := tx.CreateBucket(bucketDevices)
		if err != nil {
			return err
		}
		for _, id := range slices.Sorted(maps.Keys(st.devices)) { // in order: bbolt fills its pages
			if err := putDevice(b, st.devices[id]); err != nil {
				return err
			}
		}
		return putMeta(tx, st.epoch, st.seq)
	})
	if err != nil {
		return err
	}
	next := newState(st.devices)
	r.mu.Lock()
	was := len(r.st.devices)
	r.st, r.epoch, r.seq, r.lastApply = next, st.epoch, st.seq, r.now()
	r.mu.Unlock()
	r.resync = false
	r.log.Info("snapshot applied", "epoch", st.epoch, "seq", st.seq,
		"devices", len(st.devices), "devices_before", was, "malformed", st.skipped)
	return nil
}
