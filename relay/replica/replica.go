// Package replica keeps a relay's copy of what the control plane knows about
// every device of the cluster (public key, name, revocation, leases,
// presence) in a bbolt file and in memory, so that the relay serves from it
// without asking NATS and keeps serving known devices while the control
// plane is away.
//
// # What it keeps
//
// The file, <data dir>/relay.db, holds one record per device
// (controlplane.DeviceRecord) and the (epoch, seq) of the control plane's
// last event it reflects. The records an event or a snapshot changes and the
// seq it brings the replica to are written in one transaction, so the file
// never holds half of either. Lookups (Device, ByHostname, ByPort, Ports)
// and Admit's checks read indexes in memory, built from the file at Open, so
// a relay restarted while the control plane is down serves at once; the
// presence it loads is as last heard, until the next snapshot.
//
// # Keeping up with the control plane
//
// relay/cluster.md describes the protocol. One goroutine subscribes to
// controlplane.SubjectEvents, then loops: while the replica needs a
// snapshot, it asks for the pages and hands each to ApplySnapshot (the first
// with first=true); then it hands the events it received, in order, to
// Apply, and goes back to a snapshot whenever Apply's Result says so.
// Events that arrive during a snapshot wait in the subscription's channel
// and are applied after its last page: each device skips the events its page
// already reflects, so pages read at different seqs still add up to one state.
//
// A snapshot replaces the data only with its last page, in one
// transaction: a crash or a lost page halfway leaves the previous data in
// place, served until a snapshot completes.
//
// # Control plane away
//
// Admit authenticates a known, unrevoked key from the replica and hands out
// a provisional generation one above the newest seen for the device,
// persisted before it is returned. New enrollments and new leases wait for
// the control plane: the replica only learns them from it. Revocation
// notices sent to this relay are kept apart (Revoke) and hold whatever the
// events and snapshots say.
package replica

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Config configures a Replica.
type Config struct {
	// Path is the bbolt file, normally <data dir>/relay.db. Required.
	Path string
	// LockTimeout bounds the wait for the file lock held by another
	// process. Zero means 1s.
	LockTimeout time.Duration
	// Logger receives snapshot swaps, resyncs and malformed events, never
	// one line per event. Nil means slog.DiscardHandler.
	Logger *slog.Logger
	// Now is the clock of Stats.LastApply. Nil means time.Now.
	Now func() time.Time
}

// Errors. ErrUnknownKey and ErrRevoked are *controlplane.Error values, so
// controlplane.KindOf classifies them like the control plane's own refusals.
var (
	// ErrUnknownKey: Admit was given a key the replica does not know.
	ErrUnknownKey = controlplane.Errorf(controlplane.KindUnauthorized, "device key is not enrolled (as far as this relay knows)")
	// ErrRevoked: Admit was given the key of a revoked device.
	ErrRevoked = controlplane.Errorf(controlplane.KindRevoked, "device was revoked")
	// ErrNoSnapshot: ApplySnapshot got a page with first=false but no
	// snapshot is in progress (none was started, or one was dropped).
	ErrNoSnapshot = errors.New("replica: no snapshot in progress; start again with the first page")
	// ErrEpochChanged: a snapshot page belongs to another epoch than the
	// first page (the control plane restarted); the snapshot was dropped.
	ErrEpochChanged = errors.New("replica: the control plane's epoch changed during the snapshot; start again")
	// ErrClosed: the replica was closed.
	ErrClosed = errors.New("replica: closed")
)

var (
	bucketMeta        = []byte("meta")        // "schema", "epoch", "seq" (8 bytes big-endian)
	bucketDevices     = []byte("devices")     // device ID → stored JSON
	bucketProvisional = []byte("provisional") // device ID → newest provisional generation (8 bytes big-endian)
	bucketNoticed     = []byte("noticed")     // device ID → unix ms of a revocation notice (see Revoke)
	keySchema         = []byte("schema")
	keyEpoch          = []byte("epoch")
	keySeq            = []byte("seq")
)

const schemaVersion = "1"

// stored is a device record as the file keeps it.
type stored struct {
	controlplane.DeviceRecord
	// AsOf is the seq of the newest information about the device: its
	// snapshot page's or its last event's. Events at or below it are
	// already in the record.
	AsOf uint64 `json:"as_of"`
}

// Replica is a relay's copy of the control plane's device state. It is safe
// for concurrent use: lookups share a read lock and never touch the disk;
// writers (Apply, ApplySnapshot) are serialised, write the file first and
// then update memory in a short critical section.
type Replica struct {
	db  *bolt.DB
	log *slog.Logger
	now func() time.Time

	// wmu serialises the writers of device data and guards what only they
	// touch: staging, closed, resync.
	wmu     sync.Mutex
	staging *staging
	closed  bool
	resync  bool // the last Apply asked for a snapshot (logged once)

	mu        sync.RWMutex
	st        *state
	prov      map[string]uint64 // device ID → newest provisional generation handed out
	noticed   map[string]bool   // device IDs revoked by a notice to this relay (see Revoke)
	epoch     string
	seq       uint64
	lastApply time.Time
}

// Open opens or creates the replica's file and loads it into memory. It
// fails within cfg.LockTimeout when another process holds the file.
func Open(cfg Config) (*Replica, error) {
	if cfg.Path == "" {
		return nil, errors.New("replica: Path is required")
	}
	if cfg.LockTimeout <= 0 {
		cfg.LockTimeout = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: cfg.LockTimeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: the file is locked by another process (is another relay using this data dir?)", cfg.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", cfg.Path, err)
	}
	// Admit's lone call waits this long for others to share its
	// transaction: enough to gather a reconnect storm, little for one device.
	db.MaxBatchDelay = 2 * time.Millisecond
	r := &Replica{db: db, log: cfg.Logger, now: cfg.Now, prov: map[string]uint64{}, noticed: map[string]bool{}}
	if err := r.load(); err != nil {
		db.Close()
		return nil, fmt.Errorf("load %s: %w", cfg.Path, err)
	}
	r.log.Info("replica loaded", "path", cfg.Path, "devices", len(r.st.devices), "epoch", r.epoch, "seq", r.seq)
	return r, nil
}

// load creates the buckets if needed and reads the file into memory.
func (r *Replica) load() error {
	var devices map[string]*device
	err := r.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketDevices, bucketProvisional, bucketNoticed} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keySchema); v != nil && string(v) != schemaVersion {
			return fmt.Errorf("schema version %s, this build knows %s", v, schemaVersion)
		}
		if err := meta.Put(keySchema, []byte(schemaVersion)); err != nil {
			return err
		}
		r.epoch, r.seq = string(meta.Get(keyEpoch)), getUint64(meta.Get(keySeq))
		devices = map[string]*device{}
		err := tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var s stored
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("decode device %s: %w", k, err)
			}
			devices[s.ID] = &device{rec: s.DeviceRecord, asOf: s.AsOf}
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketProvisional).ForEach(func(k, v []byte) error {
			r.prov[string(k)] = getUint64(v)
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketNoticed).ForEach(func(k, _ []byte) error {
			r.noticed[string(k)] = true
			return nil
		})
	})
	r.st = newState(devices)
	return err
}

// Close closes the file. Lookups keep answering from memory; writes fail
// with ErrClosed.
func (r *Replica) Close() error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	r.staging = nil
	return r.db.Close()
}

// Epoch returns the control plane's epoch and the seq of the last event
// the replica reflects; "" and 0 before its first snapshot.
func (r *Replica) Epoch() (string, uint64) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.epoch, r.seq
}

// Device returns the record of a device. The record shares its slices with
// the replica: read them, never modify them.
func (r *Replica) Device(id string) (controlplane.DeviceRecord, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	d, ok := r.st.devices[id]
	if !ok {
		return controlplane.DeviceRecord{}, false
	}
	rec, _ := r.withNotice(d.rec, controlplane.Lease{})
	return rec, true
}

// withNotice marks rec (and its lease) revoked and offline if a notice
// said so. Callers hold r.mu.
func (r *Replica) withNotice(rec controlplane.DeviceRecord, lease controlplane.Lease) (controlplane.DeviceRecord, controlplane.Lease) {
	if r.noticed[rec.ID] {
		rec.Revoked, rec.Online, lease.Online = true, false, false
	}
	return rec, lease
}

// Revoke records a revocation notice to this relay: from now on, across
// restarts, the device is revoked (Device, the lookups and Admit say so)
// whatever the replica learns or has not learnt yet from the control
// plane's events and snapshots. It is on disk when Revoke returns.
// Revocations are final, so the notice is never dropped.
func (r *Replica) Revoke(id string) error {
	r.mu.RLock()
	done := r.noticed[id]
	r.mu.RUnlock()
	if done {
		return nil
	}
	err := r.db.Batch(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketNoticed).Put([]byte(id), putUint64(uint64(r.now().UnixMilli())))
	})
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		err = ErrClosed
	}
	if err != nil {
		return fmt.Errorf("record the revocation of device %s: %w", id, err)
	}
	r.mu.Lock()
	r.noticed[id] = true
	r.mu.Unlock()
	return nil
}

// ByHostname finds the device holding the lease of a hostname label (the
// first label of the public hostname, lower case, as leases spell it) and
// that lease, with its presence fields (Relay, Online, Generation) filled in
// from the device. A revoked device is returned too, with Revoked set: the
// caller refuses it. The record shares its slices with the replica.
func (r *Replica) ByHostname(label string) (controlplane.DeviceRecord, controlplane.Lease, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	rec, lease, ok := r.st.lookup(r.st.hosts[label], func(l *controlplane.Lease) bool { return l.Hostname == label })
	rec, lease = r.withNotice(rec, lease)
	return rec, lease, ok
}

// ByPort is ByHostname for a leased TCP port.
func (r *Replica) ByPort(port uint16) (controlplane.DeviceRecord, controlplane.Lease, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	rec, lease, ok := r.st.lookup(r.st.ports[port], func(l *controlplane.Lease) bool { return l.Port == port })
	rec, lease = r.withNotice(rec, lease)
	return rec, lease, ok
}

// Ports returns every leased TCP port of the cluster (revoked devices'
// included: their names stay theirs), sorted: the ports a relay listens on.
func (r *Replica) Ports() []uint16 {
	r.mu.RLock()
	ports := make([]uint16, 0, len(r.st.ports))
	for p := range r.st.ports {
		ports = append(ports, p)
	}
	r.mu.RUnlock()
	slices.Sort(ports)
	return ports
}

// Stats is a summary of the replica for metrics and health checks.
type Stats struct {
	Devices   int       // records, revoked ones included
	Revoked   int       // revoked devices
	Online    int       // devices online on some relay, as last heard
	Hostnames int       // leased hostname labels
	Ports     int       // leased TCP ports
	Epoch     string    // the control plane's epoch; "" before the first snapshot
	Seq       uint64    // the last event reflected
	LastApply time.Time // when a snapshot or an event was last applied; zero if never since Open
}

// Stats returns the replica's figures.
func (r *Replica) Stats() Stats {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return Stats{
		Devices: len(r.st.devices), Revoked: r.st.revoked, Online: r.st.online,
		Hostnames: len(r.st.hosts), Ports: len(r.st.ports),
		Epoch: r.epoch, Seq: r.seq, LastApply: r.lastApply,
	}
}

// Admit authenticates a device by its public key while the control plane
// is away. The key must be known and not revoked: otherwise the error
// wraps ErrUnknownKey or ErrRevoked. It returns the device's record (its
// names are its leases) and a provisional generation one above the newest
// the replica has seen for the device, its own earlier admissions
// included; that generation is on disk before Admit returns, so no two
// admissions reuse one, across restarts too. Concurrent admissions share
// transactions (bbolt's Batch).
func (r *Replica) Admit(pub []byte) (controlplane.DeviceRecord, uint64, error) {
	r.mu.RLock()
	d := r.st.devices[r.st.byKey[string(pub)]]
	var floor uint64
	noticed := false
	if d != nil {
		floor = max(d.rec.Generation, r.prov[d.rec.ID])
		noticed = r.noticed[d.rec.ID]
	}
	r.mu.RUnlock()
	switch {
	case d == nil:
		return controlplane.DeviceRecord{}, 0, fmt.Errorf("admit device %s: %w", frames.DeviceID(pub), ErrUnknownKey)
	case d.rec.Revoked || noticed:
		return controlplane.DeviceRecord{}, 0, fmt.Errorf("admit device %s (%s): %w", d.rec.Name, d.rec.ID, ErrRevoked)
	}
	id := []byte(d.rec.ID)
	var gen uint64
	err := r.db.Batch(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketProvisional)
		gen = max(floor, getUint64(b.Get(id))) + 1 // from scratch: Batch may run this again
		return b.Put(id, putUint64(gen))
	})
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		err = ErrClosed
	}
	if err != nil {
		return controlplane.DeviceRecord{}, 0, fmt.Errorf("admit device %s: persist generation: %w", d.rec.Name, err)
	}
	r.mu.Lock()
	r.prov[d.rec.ID] = max(r.prov[d.rec.ID], gen)
	r.mu.Unlock()
	return d.rec, gen, nil
}

func getUint64(b []byte) uint64 {
	if len(b) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

func putUint64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// putMeta records the (epoch, seq) the data reflects.
func putMeta(tx *bolt.Tx, epoch string, seq uint64) error {
	meta := tx.Bucket(bucketMeta)
	if err := meta.Put(keyEpoch, []byte(epoch)); err != nil {
		return err
	}
	return meta.Put(keySeq, putUint64(seq))
}

func putDevice(b *bolt.Bucket, d *device) error {
	data, err := json.Marshal(stored{DeviceRecord: d.rec, AsOf: d.asOf})
	if err != nil {
		return err
	}
	return b.Put([]byte(d.rec.ID), data)
}

// write runs fn in a write transaction, reporting a closed file as ErrClosed.
func (r *Replica) write(fn func(*bolt.Tx) error) error {
	if r.closed {
		return ErrClosed
	}
	return r.db.Update(fn)
}

// check runs bbolt's consistency checks on the file.
func (r *Replica) check() error {
	var first error
	err := r.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() { // drain: Check's goroutine sends them all
			first = cmp.Or(first, err)
		}
		return first
	})
	return err
}
