package boltstore

import (
	"bytes"
	"context"
	"maps"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
)

// deviceLeases returns the leases of device id with their keys.
func deviceLeases(tx *bolt.Tx, id string) (keys [][]byte, leases []controlplane.Lease, err error) {
	prefix := []byte(id + "/")
	c := tx.Bucket(bucketLeases).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		var l controlplane.Lease
		if _, err := getJSON(tx.Bucket(bucketLeases), k, &l); err != nil {
			return nil, nil, err
		}
		keys, leases = append(keys, bytes.Clone(k)), append(leases, l)
	}
	return keys, leases, nil
}

// DeleteDevice removes a revoked device: its record and its name go, and
// its leases go into quarantine (Quarantine), unless keepNames: then they
// stay taken, by nobody, until ReleaseLease frees them. It returns the
// device and the leases it held.
func (s *Store) DeleteDevice(ctx context.Context, nameOrID string, keepNames bool) (controlplane.Device, []controlplane.Lease, error) {
	now := s.cfg.Now().UTC()
	var d controlplane.Device
	var leases []controlplane.Lease
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		if d, err = findDevice(tx, nameOrID); err != nil {
			return err
		}
		if !d.Revoked {
			return controlplane.Errorf(controlplane.KindConflict, "device %s is not revoked: revoke it first", d.Name)
		}
		var keys [][]byte
		if keys, leases, err = deviceLeases(tx, d.ID); err != nil {
			return err
		}
		if !keepNames {
			for i, l := range leases {
				if err := s.quarantine(tx, l, now); err != nil {
					return err
				}
				if err := s.release(tx, l); err != nil {
					return err
				}
				if err := tx.Bucket(bucketLeases).Delete(keys[i]); err != nil {
					return err
				}
			}
		}
		if err := tx.Bucket(bucketNames).Delete([]byte(d.Name)); err != nil {
			return err
		}
		return tx.Bucket(bucketDevices).Delete([]byte(d.ID))
	})
	return d, leases, wrap("delete device "+nameOrID, err)
}

// quarantine keeps l's hostname or port from anyone until Quarantine has
// passed.
func (s *Store) quarantine(tx *bolt.Tx, l controlplane.Lease, now time.Time) error {
	q := quarantinedName{Until: now.Add(s.cfg.Quarantine), DeviceID: l.DeviceID, Service: l.Service}
	if l.Hostname != "" {
		if err := putJSON(tx.Bucket(bucketQuarantine), hostKey(l.Hostname), q); err != nil {
			return err
		}
	}
	if l.Port != 0 {
		return putJSON(tx.Bucket(bucketQuarantine), portQKey(l.Port), q)
	}
	return nil
}

// CreateReplaceToken makes a one-use enrollment token, valid for ttl,
// with which a new device (a new key) takes over the name, labels and
// leases of a revoked device. The secret is returned once.
func (s *Store) CreateReplaceToken(ctx context.Context, nameOrID string, ttl time.Duration) (string, controlplane.Token, error) {
	d, err := s.Device(ctx, nameOrID)
	if err != nil {
		return "", controlplane.Token{}, err
	}
	if !d.Revoked {
		return "", controlplane.Token{}, controlplane.Errorf(controlplane.KindConflict, "device %s is not revoked: revoke it first", d.Name)
	}
	return s.createToken(1, ttl, maps.Clone(d.Labels), d.ID)
}

// takeOver moves the name and leases of the revoked device oldID to the
// new device d (inside Enroll) and deletes the old record.
func takeOver(tx *bolt.Tx, d *controlplane.Device, oldID string) error {
	var old controlplane.Device
	if ok, err := getJSON(tx.Bucket(bucketDevices), []byte(oldID), &old); err != nil {
		return err
	} else if !ok {
		return controlplane.Errorf(controlplane.KindUnauthorized, "the device this token replaces is gone (deleted, or replaced already)")
	}
	if !old.Revoked {
		return controlplane.Errorf(controlplane.KindUnauthorized, "the device this token replaces, %s, is not revoked", old.Name)
	}
	keys, leases, err := deviceLeases(tx, oldID)
	if err != nil {
		return err
	}
	for i, l := range leases {
		key := []byte(d.ID + "/" + l.Service)
		l.DeviceID, l.DeviceName = d.ID, old.Name
		if l.Hostname != "" {
			if err := tx.Bucket(bucketHostnames).Put([]byte(l.Hostname), key); err != nil {
				return err
			}
		}
		if l.Port != 0 {
			if err := tx.Bucket(bucketPorts).Put(portKey(l.Port), key); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bucketLeases).Delete(keys[i]); err != nil {
			return err
		}
		if err := putJSON(tx.Bucket(bucketLeases), key, l); err != nil {
			return err
		}
	}
	d.Name, d.Labels, d.Replaced, d.Services = old.Name, old.Labels, old.ID, old.Services
	if err := tx.Bucket(bucketNames).Put([]byte(old.Name), []byte(d.ID)); err != nil {
		return err
	}
	return tx.Bucket(bucketDevices).Delete([]byte(oldID))
}
