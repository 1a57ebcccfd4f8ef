package natsapi

import (
	"context"
	"strconv"

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
