package boltstore

import (
	"bytes"
	"context"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
)

// Clone detection: this many takeovers of a live session younger than
// cloneYoung, within cloneWindow, refuse further takeovers.
const (
	cloneTakeovers = 5
	cloneWindow    = time.Minute
	cloneYoung     = 30 * time.Second
)

// Enroll registers a public key with an enrollment token. Enrolling a key
// that is already enrolled succeeds again without using the token up.
func (s *Store) Enroll(ctx context.Context, req controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	if len(req.PublicKey) != 32 {
		return controlplane.EnrollResponse{}, controlplane.Errorf(controlplane.KindInvalid, "public key must be 32 bytes (ed25519), got %d", len(req.PublicKey))
	}
	if err := controlplane.ValidDeviceName(req.Name); err != nil {
		return controlplane.EnrollResponse{}, err
	}
	id := frames.DeviceID(req.PublicKey)
	now := s.cfg.Now().UTC()
	var resp controlplane.EnrollResponse
	err := s.db.Batch(func(tx *bolt.Tx) error {
		resp = controlplane.EnrollResponse{} // Batch may run this more than once
		tokens := tx.Bucket(bucketTokens)
		key := []byte(req.TokenHash)
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
		tok.Used++
		d = controlplane.Device{
			ID: id, PublicKey: req.PublicKey, Labels: tok.Labels,
			EnrolledAt: now, TokenID: tok.ID, AgentVersion: req.AgentVersion,
		}
		if tok.Replaces != "" {
			// A replacement: the revoked device's name and leases, whatever
			// name the new one asked for.
			if err := takeOver(tx, &d, tok.Replaces); err != nil {
				return err
			}
		} else {
			name, err := pickName(tx.Bucket(bucketNames), req.Name, req.NameIsDefault)
			if err != nil {
				return err
			}
			d.Name = name
			if err := tx.Bucket(bucketNames).Put([]byte(name), []byte(id)); err != nil {
				return err
			}
		}
		if err := putJSON(tokens, key, tok); err != nil {
			return err
		}
		resp = controlplane.EnrollResponse{DeviceID: id, Name: d.Name}
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

// Devices lists every device, ordered by name.
func (s *Store) Devices(ctx context.Context) ([]controlplane.Device, error) {
	var out []controlplane.Device
	err := s.db.View(func(tx *bolt.Tx) error {
		return forEachJSON(tx.Bucket(bucketDevices), func(d controlplane.Device) { out = append(out, d) })
	})
	slices.SortFunc(out, func(a, b controlplane.Device) int { return strings.Compare(a.Name, b.Name) })
	return out, wrap("list devices", err)
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
