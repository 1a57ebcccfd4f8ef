package natsapi

import (
	"context"
	"strconv"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

// ReleaseLease frees a lease (hostname label or port) into quarantine and
// tells every relay the device's remaining leases, so that none serves
// the name any more.
func (s *Service) ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error) {
	req := controlplane.LookupRequest{Hostname: name}
	if p, err := strconv.ParseUint(name, 10, 16); err == nil {
		req = controlplane.LookupRequest{Port: uint16(p)}
	}
	held, err := s.cfg.Store.Lookup(ctx, req)
	if err != nil {
		return held, err
	}
	defer s.events.lockDevice(held.DeviceID)() // events of one device go out in store order
	l, err := s.cfg.Store.ReleaseLease(ctx, name)
	if err != nil {
		return l, err
	}
	s.publishRecord(ctx, l.DeviceID, func(rec controlplane.DeviceRecord) controlplane.DeviceEvent {
		return controlplane.DeviceEvent{Kind: controlplane.EventLeases, DeviceID: rec.ID, Generation: rec.Generation, Leases: rec.Leases}
	})
	s.log.Info("lease released", "hostname", l.Hostname, "port", l.Port, "device", l.DeviceName, "service", l.Service)
	return l, nil
}

// DeleteDevice revokes a device cluster-wide (if it is not revoked yet),
// then deletes it: its name is free, its leases go into quarantine unless
// keepNames. Relays forget it.
func (s *Service) DeleteDevice(ctx context.Context, nameOrID string, keepNames bool) (controlplane.RevokeResult, []controlplane.Lease, error) {
	res, err := s.Revoke(ctx, nameOrID)
	if err != nil {
		return res, nil, err
	}
	defer s.events.lockDevice(res.Device.ID)()
	_, leases, err := s.cfg.Store.DeleteDevice(ctx, res.Device.ID, keepNames)
	if err != nil {
		return res, nil, err
	}
	s.publish(controlplane.DeviceEvent{Kind: controlplane.EventDeleted, DeviceID: res.Device.ID})
	s.log.Info("device deleted", "device", res.Device.Name, "device_id", res.Device.ID, "leases", len(leases), "keep_names", keepNames)
	return res, leases, nil
}

// ReplaceDevice revokes a device cluster-wide (if it is not revoked yet)
// and returns a one-use token with which a new device takes over its
// name, labels and leases.
func (s *Service) ReplaceDevice(ctx context.Context, nameOrID string, ttl time.Duration) (controlplane.RevokeResult, string, controlplane.Token, error) {
	res, err := s.Revoke(ctx, nameOrID)
	if err != nil {
		return res, "", controlplane.Token{}, err
	}
	secret, tok, err := s.cfg.Store.CreateReplaceToken(ctx, res.Device.ID, ttl)
	return res, secret, tok, err
}
