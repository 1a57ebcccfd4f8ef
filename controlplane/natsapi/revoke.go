package natsapi

import (
	"context"
	"fmt"
	"slices"
	"sync"

	"github.com/tetherfleet/tether/controlplane"
)

// Revoke revokes a device (by name or ID), publishes the revocation and
// asks every live relay to confirm that it cut the device off, in
// parallel, each within RevokeTimeout. The result names the relays that
// confirmed and those that did not (yet): the live ones that did not
// answer, and the lost ones (silent, perhaps cut off from NATS while
// still serving). They apply the revocation when they reach the control
// plane again (from the event, or a snapshot). When NATS is unreachable,
// the revocation is stored, every live relay is pending and Undelivered
// says why.
func (s *Service) Revoke(ctx context.Context, nameOrID string) (controlplane.RevokeResult, error) {
	d, err := s.cfg.Store.Device(ctx, nameOrID)
	if err != nil {
		return controlplane.RevokeResult{}, err
	}
	unlock := s.events.lockDevice(d.ID)
	d, err = s.cfg.Store.Revoke(ctx, d.ID)
	if err != nil {
		unlock()
		return controlplane.RevokeResult{}, err
	}
	s.log.Info("device revoked", "device", d.Name, "device_id", d.ID)
	pubErr := s.events.publish(controlplane.DeviceEvent{Kind: controlplane.EventRevoked, DeviceID: d.ID})
	unlock()

	res := controlplane.RevokeResult{Device: d, Confirmed: []string{}, Pending: append([]string{}, s.members.lostRelays(s.cfg.Now())...)}
	relays := s.members.live()
	if pubErr == nil && !s.nc.IsConnected() {
		pubErr = fmt.Errorf("not connected to NATS (%s)", s.nc.Status())
	}
	if pubErr != nil {
		res.Undelivered = fmt.Sprintf("the relays could not be told: %v", pubErr)
		for _, r := range relays {
			res.Pending = append(res.Pending, r.ID)
		}
		s.log.Error("revocation not announced", "device", d.Name, "err", pubErr)
		return res, nil
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, r := range relays {
		wg.Go(func() {
			rctx, cancel := context.WithTimeout(ctx, s.cfg.RevokeTimeout)
			defer cancel()
			_, err := request[controlplane.RevokeNotice, struct{}](rctx, s.nc, controlplane.RelaySubject(r.ID, controlplane.RelayOpRevoke), controlplane.RevokeNotice{DeviceID: d.ID})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				s.log.Warn("relay did not confirm a revocation", "relay", r.ID, "device", d.Name, "err", err)
				res.Pending = append(res.Pending, r.ID)
				return
			}
			res.Confirmed = append(res.Confirmed, r.ID)
		})
	}
	wg.Wait()
	slices.Sort(res.Confirmed)
	slices.Sort(res.Pending)
	return res, nil
}
