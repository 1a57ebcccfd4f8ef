// Package boltstore keeps the control plane's state (devices, enrollment
// tokens, leases, presence) in a bbolt file, one transaction per operation.
package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
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
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
}

// Clone detection: this many takeovers of a live session younger than
// cloneYoung, within cloneWindow, refuse further takeovers.
const (
	cloneTakeovers = 5
	cloneWindow    = time.Minute
	cloneYoung     = 30 * time.Second
)

var (
	bucketDevices   = []byte("devices")   // device ID → Device JSON
	bucketNames     = []byte("names")     // device name → device ID
	bucketTokens    = []byte("tokens")    // hex sha256(token) → Token JSON
	bucketLeases    = []byte("leases")    // deviceID/service → Lease JSON
	bucketHostnames = []byte("hostnames") // hostname label → lease key
	bucketPorts     = []byte("ports")     // big-endian port → lease key
	bucketMeta      = []byte("meta")      // "schema" → version
	allBuckets      = [][]byte{bucketDevices, bucketNames, bucketTokens, bucketLeases, bucketHostnames, bucketPorts, bucketMeta}
)

const schemaVersion = "1"

// Store is the control plane's state. It is safe for concurrent use and
// implements controlplane.Relays. The operations relays call in bursts
// (enroll, connect, register, disconnect) use bbolt's Batch, so concurrent
// calls share one transaction and one fsync; their closures reset their
// results first, since Batch may run one again after another fails.
type Store struct {
	db  *bolt.DB
	cfg Config
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

// ---- enrollment tokens ----

var tokenEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// CreateToken makes an enrollment token usable uses times (≥1) until ttl
// (>0) passes. The secret is returned once; only its hash is stored.
func (s *Store) CreateToken(ctx context.Context, uses int, ttl time.Duration, labels map[string]string) (string, controlplane.Token, error) {
	if uses < 1 {
		return "", controlplane.Token{}, controlplane.Errorf(controlplane.KindInvalid, "uses must be at least 1, not %d", uses)
	}
	if ttl <= 0 {
		return "", controlplane.Token{}, controlplane.Errorf(controlplane.KindInvalid, "ttl must be positive, not %v", ttl)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	secret := controlplane.TokenPrefix + strings.ToLower(tokenEncoding.EncodeToString(raw))
	key := tokenKey(secret)
	now := s.cfg.Now().UTC()
	tok := controlplane.Token{
		ID: string(key[:12]), Uses: uses, ExpiresAt: now.Add(ttl),
		Labels: maps.Clone(labels), CreatedAt: now,
	}
	err := s.db.Update(func(tx *bolt.Tx) error { return putJSON(tx.Bucket(bucketTokens), key, tok) })
	if err != nil {
		return "", controlplane.Token{}, fmt.Errorf("store token: %w", err)
	}
	return secret, tok, nil
}

func tokenKey(secret string) []byte {
	sum := sha256.Sum256([]byte(secret))
	return []byte(hex.EncodeToString(sum[:]))
}

// Tokens lists the enrollment tokens (without secrets).
func (s *Store) Tokens(ctx context.Context) ([]controlplane.Token, error) {
	var out []controlplane.Token
	err := s.db.View(func(tx *bolt.Tx) error {
		return forEachJSON(tx.Bucket(bucketTokens), func(t controlplane.Token) { out = append(out, t) })
	})
	return out, err
}

// ---- devices ----

// Enroll registers a public key with an enrollment token. Enrolling a key
// that is already enrolled succeeds again without using the token up.
func (s *Store) Enroll(ctx context.Context, req controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	if len(req.PublicKey) != 32 {
		return controlplane.EnrollResponse{}, controlplane.Errorf(controlplane.KindInvalid, "public key must be 32 bytes (ed25519), got %d", len(req.PublicKey))
	}
	if err := controlplane.ValidDeviceName(req.Name); err != nil {
		return controlplane.EnrollResponse{}, err
	}
	if !strings.HasPrefix(req.Token, controlplane.TokenPrefix) {
		return controlplane.EnrollResponse{}, controlplane.Errorf(controlplane.KindUnauthorized, "enrollment token is not valid (tokens start with %s)", controlplane.TokenPrefix)
	}
	id := frames.DeviceID(req.PublicKey)
	now := s.cfg.Now().UTC()
	var resp controlplane.EnrollResponse
	err := s.db.Batch(func(tx *bolt.Tx) error {
		resp = controlplane.EnrollResponse{} // Batch may run this more than once
		tokens := tx.Bucket(bucketTokens)
		key := tokenKey(req.Token)
		var tok controlplane.Token
		if ok, err := getJSON(tokens, key, &tok); err != nil {
			return err
		} else if !ok {
			return controlplane.Errorf(controlplane.KindUnauthorized, "enrollment token is not valid")
		}
		var d controlplane.Device
		if ok, err := getJSON(tx.Bucket(bucketDevices), []byte(id), &d); err != nil {
			return err
		} else if ok {
			if d.Revoked {
				return controlplane.Errorf(controlplane.KindRevoked, "device %s was revoked; enroll again with a new key", d.Name)
			}
			resp = controlplane.EnrollResponse{DeviceID: d.ID, Name: d.Name}
			return nil
		}
		if !now.Before(tok.ExpiresAt) {
			return controlplane.Errorf(controlplane.KindUnauthorized, "enrollment token %s expired at %s", tok.ID, tok.ExpiresAt.Format(time.RFC3339))
		}
		if tok.Used >= tok.Uses {
			return controlplane.Errorf(controlplane.KindUnauthorized, "enrollment token %s is used up (%d of %d uses)", tok.ID, tok.Used, tok.Uses)
		}
		name, err := pickName(tx.Bucket(bucketNames), req.Name, req.NameIsDefault)
		if err != nil {
			return err
		}
		tok.Used++
		d = controlplane.Device{
			ID: id, Name: name, PublicKey: req.PublicKey, Labels: tok.Labels,
			EnrolledAt: now, TokenID: tok.ID, AgentVersion: req.AgentVersion,
		}
		if err := putJSON(tokens, key, tok); err != nil {
			return err
		}
		if err := tx.Bucket(bucketNames).Put([]byte(name), []byte(id)); err != nil {
			return err
		}
		resp = controlplane.EnrollResponse{DeviceID: id, Name: name}
		return putJSON(tx.Bucket(bucketDevices), []byte(id), d)
	})
	return resp, wrap("enroll", err)
}

// pickName returns name if free; a taken name is refused, or suffixed
// (-2, -3, …) when it was only the device's default (its hostname).
func pickName(names *bolt.Bucket, name string, suffixOK bool) (string, error) {
	if names.Get([]byte(name)) == nil {
		return name, nil
	}
	if !suffixOK {
		return "", controlplane.Errorf(controlplane.KindConflict, "device name %q is taken by another device; choose another TETHER_DEVICE_NAME", name)
	}
	for i := 2; i < 100000; i++ {
		sfx := "-" + strconv.Itoa(i)
		cand := strings.TrimRight(name[:min(len(name), 40-len(sfx))], "-") + sfx
		if names.Get([]byte(cand)) == nil {
			return cand, nil
		}
	}
	return "", controlplane.Errorf(controlplane.KindConflict, "no free name for %q", name)
}

// Connect opens a session: the newest generation wins.
func (s *Store) Connect(ctx context.Context, req controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
	id := frames.DeviceID(req.PublicKey)
	now := s.cfg.Now().UTC()
	var resp controlplane.ConnectResponse
	var refused error
	err := s.db.Batch(func(tx *bolt.Tx) error {
		resp, refused = controlplane.ConnectResponse{}, nil // Batch may run this more than once
		devices := tx.Bucket(bucketDevices)
		var d controlplane.Device
		if ok, err := getJSON(devices, []byte(id), &d); err != nil {
			return err
		} else if !ok || !bytes.Equal(d.PublicKey, req.PublicKey) {
			return controlplane.Errorf(controlplane.KindUnauthorized, "device key %s is not enrolled", id)
		}
		if d.Revoked {
			return controlplane.Errorf(controlplane.KindRevoked, "device %s was revoked", d.Name)
		}
		if d.Online && now.Sub(d.ConnectedAt) < cloneYoung {
			// A live, young session is being taken over: count it.
			recent := []int64{now.UnixMilli()}
			for _, t := range d.Takeovers {
				if now.Sub(time.UnixMilli(t)) < cloneWindow {
					recent = append(recent, t)
				}
			}
			d.Takeovers = recent[:min(len(recent), cloneTakeovers+1)]
			if len(recent) > cloneTakeovers {
				d.CloneSuspected = true
				refused = controlplane.Errorf(controlplane.KindConflict,
					"device %s: its key is live in another agent and the two keep taking over from each other (cloned device key? re-enroll the copies with new keys)", d.Name)
				return putJSON(devices, []byte(id), d)
			}
		}
		d.Generation++
		d.Online, d.Relay, d.ConnectedAt, d.LastSeen = true, req.RelayID, now, now
		d.Services = nil // unknown until this session registers; its leases are not online before
		if req.AgentVersion != "" {
			d.AgentVersion = req.AgentVersion
		}
		resp = controlplane.ConnectResponse{DeviceID: d.ID, Name: d.Name, Generation: d.Generation}
		return putJSON(devices, []byte(id), d)
	})
	if err == nil {
		err = refused
	}
	return resp, wrap("connect", err)
}

// Register records the services of the device's current session and
// returns a lease for each: the same names as before where it had them.
func (s *Store) Register(ctx context.Context, req controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	seen := map[string]bool{}
	for _, svc := range req.Services {
		if err := controlplane.ValidService(svc); err != nil {
			return nil, err
		}
		if seen[svc.Name] {
			return nil, controlplane.Errorf(controlplane.KindInvalid, "service %s is registered twice", svc.Name)
		}
		seen[svc.Name] = true
	}
	now := s.cfg.Now().UTC()
	var out []controlplane.Lease
	err := s.db.Batch(func(tx *bolt.Tx) error {
		out = nil // Batch may run this more than once
		d, err := s.sessionDevice(tx, req.DeviceID, req.Generation)
		if err != nil {
			return err
		}
		for _, svc := range req.Services {
			l, err := s.lease(tx, d, svc, now)
			if err != nil {
				return err
			}
			l.Relay, l.Online, l.Generation = d.Relay, true, d.Generation
			out = append(out, l)
		}
		d.Services, d.LastSeen = req.Services, now
		return putJSON(tx.Bucket(bucketDevices), []byte(d.ID), d)
	})
	return out, wrap("register", err)
}

func (s *Store) sessionDevice(tx *bolt.Tx, id string, gen uint64) (controlplane.Device, error) {
	var d controlplane.Device
	if ok, err := getJSON(tx.Bucket(bucketDevices), []byte(id), &d); err != nil {
		return d, err
	} else if !ok {
		return d, controlplane.Errorf(controlplane.KindNotFound, "no device %s", id)
	}
	if d.Revoked {
		return d, controlplane.Errorf(controlplane.KindRevoked, "device %s was revoked", d.Name)
	}
	if d.Generation != gen {
		return d, controlplane.Errorf(controlplane.KindConflict, "session %d of %s was superseded by session %d", gen, d.Name, d.Generation)
	}
	return d, nil
}

// lease returns the device's lease for svc, allocating one if needed.
func (s *Store) lease(tx *bolt.Tx, d controlplane.Device, svc controlplane.Service, now time.Time) (controlplane.Lease, error) {
	leases := tx.Bucket(bucketLeases)
	key := []byte(d.ID + "/" + svc.Name)
	var l controlplane.Lease
	if ok, err := getJSON(leases, key, &l); err != nil || ok && l.Proto == svc.Proto {
		return l, err
	} else if ok {
		// The service changed protocol: release its old name.
		if err := s.release(tx, l); err != nil {
			return l, err
		}
	}
	l = controlplane.Lease{DeviceID: d.ID, DeviceName: d.Name, Service: svc.Name, Proto: svc.Proto, CreatedAt: now}
	switch svc.Proto {
	case controlplane.ProtoHTTP:
		label, err := freeHostname(tx.Bucket(bucketHostnames), svc.Name+"-"+d.Name)
		if err != nil {
			return l, err
		}
		l.Hostname = label
		if err := tx.Bucket(bucketHostnames).Put([]byte(label), key); err != nil {
			return l, err
		}
	case controlplane.ProtoTCP:
		port, err := s.freePort(tx.Bucket(bucketPorts))
		if err != nil {
			return l, err
		}
		l.Port = port
		if err := tx.Bucket(bucketPorts).Put(portKey(port), key); err != nil {
			return l, err
		}
	}
	return l, putJSON(leases, key, l)
}

func (s *Store) release(tx *bolt.Tx, l controlplane.Lease) error {
	if l.Hostname != "" {
		if err := tx.Bucket(bucketHostnames).Delete([]byte(l.Hostname)); err != nil {
			return err
		}
	}
	if l.Port != 0 {
		return tx.Bucket(bucketPorts).Delete(portKey(l.Port))
	}
	return nil
}

func freeHostname(b *bolt.Bucket, label string) (string, error) {
	for i := 1; i < 100000; i++ {
		cand := label
		if i > 1 {
			sfx := "-" + strconv.Itoa(i)
			cand = label[:min(len(label), 63-len(sfx))] + sfx
		}
		if b.Get([]byte(cand)) == nil {
			return cand, nil
		}
	}
	return "", controlplane.Errorf(controlplane.KindConflict, "no free hostname for %s", label)
}

// freePort returns the lowest port of the range without a lease.
func (s *Store) freePort(b *bolt.Bucket) (uint16, error) {
	want := s.cfg.TCPPorts.First
	c := b.Cursor()
	for k, _ := c.Seek(portKey(want)); k != nil; k, _ = c.Next() {
		p := binary.BigEndian.Uint16(k)
		if p != want || want == s.cfg.TCPPorts.Last {
			break
		}
		want++
	}
	if b.Get(portKey(want)) != nil || want > s.cfg.TCPPorts.Last {
		return 0, controlplane.Errorf(controlplane.KindConflict, "no free TCP port left in %s", s.cfg.TCPPorts)
	}
	return want, nil
}

func portKey(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }

// Disconnect marks the session ended unless a newer one took over.
func (s *Store) Disconnect(ctx context.Context, req controlplane.DisconnectRequest) error {
	now := s.cfg.Now().UTC()
	return wrap("disconnect", s.updateDevice(req.DeviceID, func(d *controlplane.Device) bool {
		if d.Generation != req.Generation || !d.Online {
			return false
		}
		d.Online, d.LastSeen = false, now
		return true
	}))
}

// ResetRelay marks every session held by relayID as ended.
func (s *Store) ResetRelay(ctx context.Context, relayID string) error {
	now := s.cfg.Now().UTC()
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		var stale []controlplane.Device
		err := forEachJSON(b, func(d controlplane.Device) {
			if d.Online && d.Relay == relayID {
				stale = append(stale, d)
			}
		})
		for _, d := range stale {
			d.Online, d.LastSeen = false, now
			if err == nil {
				err = putJSON(b, []byte(d.ID), d)
			}
		}
		return err
	})
	return wrap("reset relay", err)
}

// Lookup finds the lease of a hostname label or a port, with its device's presence.
func (s *Store) Lookup(ctx context.Context, req controlplane.LookupRequest) (controlplane.Lease, error) {
	var l controlplane.Lease
	err := s.db.View(func(tx *bolt.Tx) error {
		var key []byte
		if req.Hostname != "" {
			key = tx.Bucket(bucketHostnames).Get([]byte(req.Hostname))
		} else {
			key = tx.Bucket(bucketPorts).Get(portKey(req.Port))
		}
		if key == nil {
			return controlplane.Errorf(controlplane.KindNotFound, "no lease for %s", cmp.Or(req.Hostname, "port "+strconv.Itoa(int(req.Port))))
		}
		if _, err := getJSON(tx.Bucket(bucketLeases), key, &l); err != nil {
			return err
		}
		var d controlplane.Device
		if _, err := getJSON(tx.Bucket(bucketDevices), []byte(l.DeviceID), &d); err != nil {
			return err
		}
		fillPresence(&l, d)
		return nil
	})
	return l, wrap("lookup", err)
}

func fillPresence(l *controlplane.Lease, d controlplane.Device) {
	l.DeviceName, l.Relay, l.Generation = d.Name, d.Relay, d.Generation
	l.Online = d.Online && !d.Revoked && slices.ContainsFunc(d.Services, func(s controlplane.Service) bool { return s.Name == l.Service })
}

// Devices lists every device, ordered by name.
func (s *Store) Devices(ctx context.Context) ([]controlplane.Device, error) {
	var out []controlplane.Device
	err := s.db.View(func(tx *bolt.Tx) error {
		return forEachJSON(tx.Bucket(bucketDevices), func(d controlplane.Device) { out = append(out, d) })
	})
	slices.SortFunc(out, func(a, b controlplane.Device) int { return strings.Compare(a.Name, b.Name) })
	return out, wrap("list devices", err)
}

// Leases lists every lease with its device's presence, ordered by device and service.
func (s *Store) Leases(ctx context.Context) ([]controlplane.Lease, error) {
	var out []controlplane.Lease
	err := s.db.View(func(tx *bolt.Tx) error {
		devices := tx.Bucket(bucketDevices)
		return forEachJSON(tx.Bucket(bucketLeases), func(l controlplane.Lease) {
			var d controlplane.Device
			getJSON(devices, []byte(l.DeviceID), &d)
			fillPresence(&l, d)
			out = append(out, l)
		})
	})
	slices.SortFunc(out, func(a, b controlplane.Lease) int {
		return cmp.Or(strings.Compare(a.DeviceName, b.DeviceName), strings.Compare(a.Service, b.Service))
	})
	return out, wrap("list leases", err)
}

// Device finds a device by name or ID.
func (s *Store) Device(ctx context.Context, nameOrID string) (controlplane.Device, error) {
	var d controlplane.Device
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		d, err = findDevice(tx, nameOrID)
		return err
	})
	return d, err
}

func findDevice(tx *bolt.Tx, nameOrID string) (controlplane.Device, error) {
	var d controlplane.Device
	id := nameOrID
	if v := tx.Bucket(bucketNames).Get([]byte(nameOrID)); v != nil {
		id = string(v)
	}
	if ok, err := getJSON(tx.Bucket(bucketDevices), []byte(id), &d); err != nil || !ok {
		if err == nil {
			err = controlplane.Errorf(controlplane.KindNotFound, "no device named %q", nameOrID)
		}
		return d, err
	}
	return d, nil
}

// Revoke revokes a device by name or ID: it can no longer connect. Its
// names stay leased to it, so nobody else can take them over.
func (s *Store) Revoke(ctx context.Context, nameOrID string) (controlplane.Device, error) {
	now := s.cfg.Now().UTC()
	var d controlplane.Device
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		if d, err = findDevice(tx, nameOrID); err != nil || d.Revoked {
			return err
		}
		d.Revoked, d.RevokedAt, d.Online = true, now, false
		return putJSON(tx.Bucket(bucketDevices), []byte(d.ID), d)
	})
	return d, wrap("revoke", err)
}

func (s *Store) updateDevice(id string, fn func(*controlplane.Device) bool) error {
	return s.db.Batch(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDevices)
		var d controlplane.Device
		if ok, err := getJSON(b, []byte(id), &d); err != nil || !ok {
			return err
		}
		if !fn(&d) {
			return nil
		}
		return putJSON(b, []byte(id), d)
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
		return true, fmt.Errorf("decode %s: %w", key, err)
	}
	return true, nil
}

func forEachJSON[T any](b *bolt.Bucket, fn func(T)) error {
	return b.ForEach(func(k, v []byte) error {
		var t T
		if err := json.Unmarshal(v, &t); err != nil {
			return fmt.Errorf("decode %s: %w", k, err)
		}
		fn(t)
		return nil
	})
}
