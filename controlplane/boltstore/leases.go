package boltstore

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
)

// Register records the services of the device's current session and
// returns a lease for each: the same names as before where it had them.
func (s *Store) Register(ctx context.Context, req controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	if len(req.Services) > s.cfg.MaxServices {
		return nil, controlplane.Errorf(controlplane.KindInvalid, "%d services; a device may have at most %d (TETHER_MAX_SERVICES)", len(req.Services), s.cfg.MaxServices)
	}
	seen := map[string]bool{}
	var legacy []controlplane.Service
	for _, svc := range req.Services {
		if err := controlplane.ValidService(svc); err != nil {
			if !frames.LegacyServiceName(svc.Name) {
				return nil, err
			}
			legacy = append(legacy, svc) // kept only if it holds its lease already
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
		for _, svc := range legacy {
			var l controlplane.Lease
			if ok, err := getJSON(tx.Bucket(bucketLeases), []byte(d.ID+"/"+svc.Name), &l); err != nil {
				return err
			} else if !ok || l.Proto != svc.Proto {
				return controlplane.ValidService(svc) // a new name of the old grammar: refused
			}
		}
		if err := s.checkQuota(tx, d, req.Services); err != nil {
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
		label, err := s.freeHostname(tx, svc.Name+"-"+d.Name, now)
		if err != nil {
			return l, err
		}
		l.Hostname = label
		if err := tx.Bucket(bucketHostnames).Put([]byte(label), key); err != nil {
			return l, err
		}
	case controlplane.ProtoTCP:
		port, err := s.freePort(tx, now)
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

// freeHostname returns label, or label--2, label--3..., the first that is
// neither leased, nor reserved, nor in quarantine. The suffix has "--",
// which no device name has (frames), so that it is nobody's SERVICE-DEVICE:
// "status-page--2" cannot be device "page-2"'s service "status".
func (s *Store) freeHostname(tx *bolt.Tx, label string, now time.Time) (string, error) {
	leased, reserved := tx.Bucket(bucketHostnames), tx.Bucket(bucketReserved)
	for i := 1; i < 100000; i++ {
		cand := label
		if i > 1 {
			sfx := "--" + strconv.Itoa(i)
			cand = label[:min(len(label), 63-len(sfx))] + sfx
		}
		if leased.Get([]byte(cand)) == nil && reserved.Get([]byte(cand)) == nil && !quarantined(tx, hostKey(cand), now) {
			return cand, nil
		}
	}
	return "", controlplane.Errorf(controlplane.KindConflict, "no free hostname for %s", label)
}

// freePort returns the lowest port of the range neither leased nor in
// quarantine.
func (s *Store) freePort(tx *bolt.Tx, now time.Time) (uint16, error) {
	b := tx.Bucket(bucketPorts)
	for p := int(s.cfg.TCPPorts.First); p <= int(s.cfg.TCPPorts.Last); p++ {
		// Skip the run of leased ports from p on with a cursor, not a Get each.
		c := b.Cursor()
		for k, _ := c.Seek(portKey(uint16(p))); k != nil && int(binary.BigEndian.Uint16(k)) == p && p <= int(s.cfg.TCPPorts.Last); k, _ = c.Next() {
			p++
		}
		if p > int(s.cfg.TCPPorts.Last) {
			break
		}
		if !quarantined(tx, portQKey(uint16(p)), now) && !s.busy(uint16(p)) {
			return uint16(p), nil
		}
	}
	return 0, controlplane.Errorf(controlplane.KindConflict, "no free TCP port left in %s", s.cfg.TCPPorts)
}

func portKey(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }

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

// Reserve records hostname labels that are a relay's own names, so that
// no lease ever takes them. When it reserves a label for the first time it
// returns the leases that already hold any of labels (a device took the
// name before the relay announced it; the relay refuses to start with it
// until the lease is released). A label stays reserved when the relay
// stops announcing it.
func (s *Store) Reserve(ctx context.Context, relayID string, labels []string) (leased []controlplane.Lease, err error) {
	missing := false
	err = s.db.View(func(tx *bolt.Tx) error {
		leased, missing = nil, false
		for _, label := range labels {
			if tx.Bucket(bucketReserved).Get([]byte(label)) == nil {
				missing = true
			}
			if key := tx.Bucket(bucketHostnames).Get([]byte(label)); key != nil {
				var l controlplane.Lease
				if _, err := getJSON(tx.Bucket(bucketLeases), key, &l); err != nil {
					return err
				}
				leased = append(leased, l)
			}
		}
		return nil
	})
	if err != nil || !missing {
		return nil, wrap("read reserved names", err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		for _, label := range labels {
			if err := tx.Bucket(bucketReserved).Put([]byte(label), []byte(relayID)); err != nil {
				return err
			}
		}
		return nil
	})
	return leased, wrap("reserve the names of relay "+relayID, err)
}

// checkQuota refuses a registration that would give the device more than
// MaxServices leases, counting those it holds for services it no longer
// registers: re-registering is idempotent, renaming services is not free.
func (s *Store) checkQuota(tx *bolt.Tx, d controlplane.Device, svcs []controlplane.Service) error {
	leases := tx.Bucket(bucketLeases)
	held := map[string]bool{}
	prefix := []byte(d.ID + "/")
	c := leases.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		held[string(k[len(prefix):])] = true
	}
	n := len(held)
	for _, svc := range svcs {
		if !held[svc.Name] {
			n++
		}
	}
	if n > s.cfg.MaxServices {
		return controlplane.Errorf(controlplane.KindInvalid,
			"device %s would hold %d leases, at most %d (TETHER_MAX_SERVICES): it holds %d, some for services it no longer registers; free them with tetherctl lease release",
			d.Name, n, s.cfg.MaxServices, len(held))
	}
	return nil
}

// quarantinedName is a released hostname or port, unleasable until Until.
type quarantinedName struct {
	Until    time.Time `json:"until"`
	DeviceID string    `json:"device_id"` // who held it
	Service  string    `json:"service"`
}

func hostKey(label string) []byte { return []byte("h:" + label) }
func portQKey(p uint16) []byte    { return append([]byte("p:"), portKey(p)...) }

// quarantined reports whether key (hostKey or portQKey) is in quarantine
// at now.
func quarantined(tx *bolt.Tx, key []byte, now time.Time) bool {
	var q quarantinedName
	ok, err := getJSON(tx.Bucket(bucketQuarantine), key, &q)
	return err != nil || ok && now.Before(q.Until) // unreadable: keep it out of use
}

// ReleaseLease frees a lease, named by its hostname label or its port:
// nobody holds it any more, and nobody may take it for Quarantine. A
// lease its device uses now (online, the service registered) is not
// released: stop the service first, or revoke the device. It returns the
// released lease.
func (s *Store) ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error) {
	now := s.cfg.Now().UTC()
	var l controlplane.Lease
	err := s.db.Update(func(tx *bolt.Tx) error {
		var key []byte
		if p, err := strconv.ParseUint(name, 10, 16); err == nil {
			key = tx.Bucket(bucketPorts).Get(portKey(uint16(p)))
		} else {
			key = tx.Bucket(bucketHostnames).Get([]byte(name))
		}
		if key == nil {
			return controlplane.Errorf(controlplane.KindNotFound, "no lease %s", name)
		}
		if ok, err := getJSON(tx.Bucket(bucketLeases), key, &l); err != nil {
			return err
		} else if !ok {
			return controlplane.Errorf(controlplane.KindNotFound, "no lease %s", name)
		}
		var d controlplane.Device
		if _, err := getJSON(tx.Bucket(bucketDevices), []byte(l.DeviceID), &d); err != nil {
			return err
		}
		if d.Online && !d.Revoked && slices.ContainsFunc(d.Services, func(s controlplane.Service) bool { return s.Name == l.Service }) {
			return controlplane.Errorf(controlplane.KindConflict, "lease %s is in use by service %s of device %s, online now: stop the service on the device, or revoke the device, first", name, l.Service, d.Name)
		}
		if err := s.quarantine(tx, l, now); err != nil {
			return err
		}
		if err := s.release(tx, l); err != nil {
			return err
		}
		return tx.Bucket(bucketLeases).Delete(key)
	})
	return l, wrap("release lease "+name, err)
}

// SetPortBusy gives the store the check of ports it must not lease now:
// another process holds them on a relay's host (natsapi.Service.PortBusy).
// Nil means none.
func (s *Store) SetPortBusy(busy func(port uint16) bool) { s.portBusy.Store(&busy) }

func (s *Store) busy(port uint16) bool {
	f := s.portBusy.Load()
	return f != nil && *f != nil && (*f)(port)
}
