package replica_test

import (
	"context"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/relay/replica"
)

// follow keeps r up to date: events come from a subscription to
// controlplane.SubjectEvents made before the first snapshot, page asks the
// control plane for the snapshot page after a device ID.
func follow(ctx context.Context, r *replica.Replica, events <-chan controlplane.DeviceEvent,
	page func(ctx context.Context, after string) (controlplane.SnapshotResponse, error)) error {
	need := true
	for {
		if need {
			after := ""
			for {
				p, err := page(ctx, after)
				if err != nil {
					return err // or back off and start again from the first page
				}
				if err := r.ApplySnapshot(p, after == ""); err != nil {
					return err
				}
				if after = p.Next; after == "" {
					break
				}
			}
		}
		// Apply what waits in the channel in one call: one disk sync.
		var batch []controlplane.DeviceEvent
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev := <-events:
			batch = append(batch, ev)
		}
		for more := true; more && len(batch) < 256; {
			select {
			case ev := <-events:
				batch = append(batch, ev)
			default:
				more = false
			}
		}
		res, err := r.Apply(batch...)
		if err != nil {
			return err
		}
		need = res.NeedSnapshot
	}
}

// A relay follows the control plane with one loop: a snapshot when the
// replica needs one, then the events, several at a time.
func Example_follow() {
	var (
		ctx    context.Context
		r      *replica.Replica
		events <-chan controlplane.DeviceEvent
		page   func(ctx context.Context, after string) (controlplane.SnapshotResponse, error)
	)
	_ = follow(ctx, r, events, page)
}
