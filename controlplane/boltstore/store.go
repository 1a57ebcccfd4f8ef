// Package boltstore keeps the control plane's state (devices, enrollment
// tokens, leases, presence) in a bbolt file, one transaction per operation.
package boltstore

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Config configures a Store.
type Config struct {
	// Path is the bbolt file. Required.
	Path string
	// TCPPorts is the range TCP leases are allocated from. Zero means 20000-29999.
	TCPPorts controlplane.PortRange
	// LockTimeout bounds the wait for the file lock held by another
	// process. Zero means 1s.
	LockTimeout time.Duration
	// MaxServices caps the leases one device holds (hostnames and TCP
	// ports, those of services it no longer registers included): beyond
	// it Register is refused, never the fleet's pool taken. Zero means 32.
	MaxServices int
	// Quarantine is how long a released hostname or port stays unleased
	// before anyone may take it. Zero means 7 days.
	Quarantine time.Duration
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
}

var (
	bucketDevices    = []byte("devices")    // device ID → Device JSON
	bucketNames      = []byte("names")      // device name → device ID
	bucketTokens     = []byte("tokens")     // hex sha256(token) → Token JSON
	bucketLeases     = []byte("leases")     // deviceID/service → Lease JSON
	bucketHostnames  = []byte("hostnames")  // hostname label → lease key
	bucketPorts      = []byte("ports")      // big-endian port → lease key
	bucketMeta       = []byte("meta")       // "schema" → version
	bucketReserved   = []byte("reserved")   // hostname label → ID of the relay whose own name it is
	bucketReleases   = []byte("releases")   // version → ReleaseRecord JSON (releases.go)
	bucketRollouts   = []byte("rollouts")   // "current" → Rollout JSON
	bucketUpdates    = []byte("updates")    // version NUL device ID → UpdateReport JSON
	bucketQuarantine = []byte("quarantine") // "h:"+label or "p:"+port → quarantined JSON (leases.go)
	allBuckets       = [][]byte{bucketDevices, bucketNames, bucketTokens, bucketLeases, bucketHostnames, bucketPorts, bucketMeta, bucketReserved,
		bucketReleases, bucketRollouts, bucketUpdates, bucketQuarantine}
)

const schemaVersion = "1"

// Store is the control plane's state. It is safe for concurrent use and
// implements controlplane.Relays. The operations relays call in bursts
// (enroll, connect, register, disconnect) use bbolt's Batch, so concurrent
// calls share one transaction and one fsync; their closures reset their
// results first, since Batch may run one again after another fails.
type Store struct {
	db       *bolt.DB
	cfg      Config
	portBusy atomic.Pointer[func(uint16) bool] // see SetPortBusy
}

var _ controlplane.Relays = (*Store)(nil)

// Open opens or creates the store. It fails within cfg.LockTimeout when
// another process holds the file.
func Open(cfg Config) (*Store, error) {
	if cfg.Path == "" {
		return nil, errors.New("boltstore: Path is required")
	}
	if cfg.TCPPorts == (controlplane.PortRange{}) {
		cfg.TCPPorts = controlplane.PortRange{First: 20000, Last: 29999}
	}
	cfg.MaxServices = cmp.Or(max(cfg.MaxServices, 0), 32)
	cfg.Quarantine = cmp.Or(max(cfg.Quarantine, 0), 7*24*time.Hour)
	if cfg.LockTimeout <= 0 {
		cfg.LockTimeout = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: cfg.LockTimeout})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: the file is locked by another process (is another relay or control plane using this data dir?)", cfg.Path)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", cfg.Path, err)
	}
	// A lone Batch call waits this long for others to share its
	// transaction: enough to gather a reconnect storm, little for one device.
	db.MaxBatchDelay = 2 * time.Millisecond
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get([]byte("schema")); v != nil && string(v) != schemaVersion {
			return fmt.Errorf("schema version %s, this build knows %s", v, schemaVersion)
		}
		return meta.Put([]byte("schema"), []byte(schemaVersion))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialise %s: %w", cfg.Path, err)
	}
	return &Store{db: db, cfg: cfg}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Check verifies the file's internal consistency (bbolt's page checks).
func (s *Store) Check() error {
	return s.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		return nil
	})
}

// wrap adds what was being done to unexpected errors; domain errors pass
// unchanged so their message stays the caller's.
func wrap(op string, err error) error {
	var e *controlplane.Error
	if err == nil || errors.As(err, &e) {
		return err
	}
	return fmt.Errorf("%s: %w", op, err)
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, data)
}

func getJSON(b *bolt.Bucket, key []byte, v any) (bool, error) {
	data := b.Get(key)
	if data == nil {
		return false, nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return true, fmt.Errorf("decode %s: %w", logKey(key), err)
	}
	return true, nil
}

// logKey is a key as it may appear in an error: a token's hash (the only
// 64-character keys) is cut to the token's public ID, since the hash is
// what enrolls over NATS.
func logKey(k []byte) string {
	if len(k) == 64 {
		return "token " + string(k[:12])
	}
	return string(k)
}

func forEachJSON[T any](b *bolt.Bucket, fn func(T)) error {
	return b.ForEach(func(k, v []byte) error {
		var t T
		if err := json.Unmarshal(v, &t); err != nil {
			return fmt.Errorf("decode %s: %w", logKey(k), err)
		}
		fn(t)
		return nil
	})
}
