package replica

import (
	"slices"

	"github.com/tetherfleet/tether/controlplane"
)

// device is one record in memory. It is never modified once in a state: a
// change stores a new *device, so lookups may hand out its slices.
type device struct {
	rec  controlplane.DeviceRecord
	asOf uint64 // see stored.AsOf
}

// state is the replica in memory: the records and the indexes lookups use.
// Writers change it under Replica.mu, readers share the lock.
//
// A name is normally held by one device, but while a snapshot's events are
// being caught up two records may both still list it: one read from an
// earlier page, before an event that released it, and one from a later
// page. The index keeps every holder and serves the one whose information
// is the newest (the highest asOf): the control plane never gives a name to
// two devices at once, so that one is right.
type state struct {
	devices map[string]*device
	byKey   map[string]string // string(public key) → device ID
	hosts   holders[string]   // hostname label → devices listing it
	ports   holders[uint16]   // TCP port → devices listing it
	online  int
	revoked int
}

// holders maps a name to the IDs of the devices whose leases list it; the
// first one serves.
type holders[K comparable] map[K][]string

func newState(devices map[string]*device) *state {
	s := &state{
		devices: make(map[string]*device, len(devices)),
		byKey:   make(map[string]string, len(devices)),
		hosts:   holders[string]{},
		ports:   holders[uint16]{},
	}
	for id, d := range devices {
		s.set(id, d)
	}
	return s
}

// set stores d as the device's record (nil removes it) and updates the
// indexes and counts.
func (s *state) set(id string, d *device) {
	old := s.devices[id]
	if d != nil {
		s.devices[id] = d
	} else {
		delete(s.devices, id)
	}
	if old != nil {
		if s.byKey[string(old.rec.PublicKey)] == id {
			delete(s.byKey, string(old.rec.PublicKey))
		}
		s.count(old, -1)
		for _, l := range old.rec.Leases {
			s.hosts.remove(l.Hostname, id, s.devices)
			s.ports.remove(l.Port, id, s.devices)
		}
	}
	if d != nil {
		s.byKey[string(d.rec.PublicKey)] = id
		s.count(d, +1)
		for _, l := range d.rec.Leases {
			s.hosts.add(l.Hostname, id, s.devices)
			s.ports.add(l.Port, id, s.devices)
		}
	}
}

func (s *state) count(d *device, n int) {
	if d.rec.Online {
		s.online += n
	}
	if d.rec.Revoked {
		s.revoked += n
	}
}

// lookup returns the serving holder among ids and its lease that match
// says is the one looked up, presence filled in.
func (s *state) lookup(ids []string, match func(*controlplane.Lease) bool) (controlplane.DeviceRecord, controlplane.Lease, bool) {
	if len(ids) == 0 {
		return controlplane.DeviceRecord{}, controlplane.Lease{}, false
	}
	d := s.devices[ids[0]]
	for i := range d.rec.Leases {
		if l := &d.rec.Leases[i]; match(l) {
			lease := *l
			lease.DeviceName = d.rec.Name
			lease.Relay, lease.Online, lease.Generation = d.rec.Relay, d.rec.Online, d.rec.Generation
			return d.rec, lease, true
		}
	}
	return controlplane.DeviceRecord{}, controlplane.Lease{}, false // unreachable: the index follows the leases
}

// add records that device id lists name k. The zero name (no hostname, no
// port) is not indexed.
func (h holders[K]) add(k K, id string, devices map[string]*device) {
	var zero K
	if k == zero {
		return
	}
	ids := h[k]
	if !slices.Contains(ids, id) {
		ids = append(ids, id)
	}
	h[k] = ids
	h.elect(k, devices)
}

// remove records that device id no longer lists name k.
func (h holders[K]) remove(k K, id string, devices map[string]*device) {
	ids, ok := h[k]
	if !ok {
		return
	}
	if i := slices.Index(ids, id); i >= 0 {
		ids = slices.Delete(ids, i, i+1)
	}
	if len(ids) == 0 {
		delete(h, k)
		return
	}
	h[k] = ids
	h.elect(k, devices)
}

// elect moves the holder with the newest information first; on a tie (a
// control plane never gives one name to two devices at one seq) the lowest
// ID, so that a reopened replica answers as before.
func (h holders[K]) elect(k K, devices map[string]*device) {
	ids := h[k]
	best := 0
	for i := 1; i < len(ids); i++ {
		a, b := devices[ids[i]].asOf, devices[ids[best]].asOf
		if a > b || a == b && ids[i] < ids[best] {
			best = i
		}
	}
	ids[0], ids[best] = ids[best], ids[0]
}
