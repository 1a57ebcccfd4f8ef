package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"slices"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
)

// Snapshot paging.
const (
	// DefaultSnapshotLimit is the page size when the request gives none.
	DefaultSnapshotLimit = 500
	// MaxSnapshotLimit caps the page size a request may ask for.
	MaxSnapshotLimit = 5000
	// maxPageBytes keeps a page well under a NATS message's size: a page
	// ends early when its records reach this many bytes of JSON.
	maxPageBytes = 512 << 10
)

// Record returns what a relay keeps of a device: identity, revocation,
// all its leases and its presence.
func (s *Store) Record(ctx context.Context, id string) (controlplane.DeviceRecord, error) {
	var rec controlplane.DeviceRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		var d controlplane.Device
		if ok, err := getJSON(tx.Bucket(bucketDevices), []byte(id), &d); err != nil {
			return err
		} else if !ok {
			return controlplane.Errorf(controlplane.KindNotFound, "no device %s", id)
		}
		var err error
		rec, err = record(tx, d)
		return err
	})
	return rec, wrap("read device record", err)
}

// record builds the DeviceRecord of d inside tx.
func record(tx *bolt.Tx, d controlplane.Device) (controlplane.DeviceRecord, error) {
	rec := controlplane.DeviceRecord{
		ID: d.ID, Name: d.Name, PublicKey: d.PublicKey, Revoked: d.Revoked,
		Online: d.Online && !d.Revoked, Relay: d.Relay, Generation: d.Generation,
	}
	prefix := []byte(d.ID + "/")
	c := tx.Bucket(bucketLeases).Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		var l controlplane.Lease
		if err := json.Unmarshal(v, &l); err != nil {
			return rec, err
		}
		fillPresence(&l, d)
		rec.Leases = append(rec.Leases, l)
	}
	return rec, nil
}

// Snapshot returns a page of device records in ID order, starting after
// the ID after, read in one transaction. limit ≤ 0 means
// DefaultSnapshotLimit; it is capped at MaxSnapshotLimit, and a page also
// ends early at maxPageBytes of JSON. next is the last ID of the page when
// more follow, "" on the last page.
func (s *Store) Snapshot(ctx context.Context, after string, limit int) (page []controlplane.DeviceRecord, next string, err error) {
	if limit <= 0 {
		limit = DefaultSnapshotLimit
	}
	limit = min(limit, MaxSnapshotLimit)
	err = s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketDevices).Cursor()
		k, v := c.First()
		if after != "" {
			k, v = c.Seek([]byte(after))
			if k != nil && string(k) == after {
				k, v = c.Next()
			}
		}
		size := 0
		for ; k != nil; k, v = c.Next() {
			if len(page) == limit || size >= maxPageBytes {
				next = page[len(page)-1].ID
				return nil
			}
			var d controlplane.Device
			if err := json.Unmarshal(v, &d); err != nil {
				return err
			}
			rec, err := record(tx, d)
			if err != nil {
				return err
			}
			size += approxSize(rec)
			page = append(page, rec)
		}
		return nil
	})
	return page, next, wrap("snapshot", err)
}

// approxSize is a close upper bound of rec's JSON size.
func approxSize(rec controlplane.DeviceRecord) int {
	n := 200 + len(rec.Name) + len(rec.ID) + len(rec.Relay) + len(rec.PublicKey)*4/3
	for _, l := range rec.Leases {
		n += 250 + len(l.Hostname) + len(l.DeviceName) + len(l.Service) + len(l.Relay)
	}
	return n
}

// Sync records the sessions relayID holds after the control plane was
// unreachable, in one transaction. A reported session is accepted unless
// its device is unknown or revoked, or another session is at least as new
// (a higher generation, or the same generation online on another relay).
// An accepted generation is kept, except that one equal to a session that
// ended on another relay is renumbered one above it: a generation names
// one session. The device's stored generation never goes down, so it stays
// ≥ every generation handed out (Connect) or accepted here. Every other
// session recorded online on relayID ends.
//
// accepted are the sessions now online on the relay, with the generation
// each has now (which the relay adopts); ended are those that were online
// on it and are not any more. Both are in device ID order.
func (s *Store) Sync(ctx context.Context, relayID string, sessions []controlplane.SyncSession) (accepted, ended []controlplane.SyncSession, err error) {
	// One session per device: the newest the relay reports.
	newest := map[string]uint64{}
	for _, ss := range sessions {
		newest[ss.DeviceID] = max(newest[ss.DeviceID], ss.Generation)
	}
	now := s.cfg.Now().UTC()
	err = s.db.Update(func(tx *bolt.Tx) error {
		accepted, ended = nil, nil
		b := tx.Bucket(bucketDevices)
		kept := map[string]bool{}
		for id, gen := range newest {
			var d controlplane.Device
			if ok, err := getJSON(b, []byte(id), &d); err != nil {
				return err
			} else if !ok || d.Revoked || gen < d.Generation || gen == d.Generation && d.Online && d.Relay != relayID {
				continue
			}
			same := gen == d.Generation && d.Relay == relayID
			if gen == d.Generation && !same {
				gen = d.Generation + 1 // that generation named a session elsewhere, now ended
			}
			if !same || !d.Online {
				d.ConnectedAt = now
			}
			d.Generation, d.Online, d.Relay, d.LastSeen = gen, true, relayID, now
			if err := putJSON(b, []byte(id), d); err != nil {
				return err
			}
			kept[id] = true
			accepted = append(accepted, controlplane.SyncSession{DeviceID: id, Generation: gen})
		}
		var stale []controlplane.Device
		err := forEachJSON(b, func(d controlplane.Device) {
			if d.Online && d.Relay == relayID && !kept[d.ID] {
				stale = append(stale, d)
			}
		})
		for _, d := range stale {
			d.Online, d.LastSeen = false, now
			if err == nil {
				err = putJSON(b, []byte(d.ID), d)
			}
			ended = append(ended, controlplane.SyncSession{DeviceID: d.ID, Generation: d.Generation})
		}
		return err
	})
	bySession := func(a, b controlplane.SyncSession) int { return cmp.Compare(a.DeviceID, b.DeviceID) }
	slices.SortFunc(accepted, bySession)
	slices.SortFunc(ended, bySession)
	return accepted, ended, wrap("sync relay "+relayID, err)
}
