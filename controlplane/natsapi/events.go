package natsapi

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/maphash"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
)

// events is the control plane's one publisher of device events. It
// stamps each with the epoch (random per start) and the next seq, and
// publishes them in seq order.
//
// A change to the store and its event are made under the device's lock
// (lockDevice), or under every lock for changes to many devices at once
// (lockAll): the events of one device are published in the order its
// changes were committed. And since an event is published only after its
// change is committed, a snapshot page read after last() returned seq S
// holds every change whose event has a seq ≤ S.
type events struct {
	nc    *nats.Conn
	epoch string

	mu  sync.Mutex // orders seq and the publishing
	seq uint64

	seed    maphash.Seed
	devices [256]sync.Mutex
}

func newEvents(nc *nats.Conn) *events {
	b := make([]byte, 16)
	rand.Read(b)
	return &events{nc: nc, epoch: hex.EncodeToString(b), seed: maphash.MakeSeed()}
}

// publish stamps ev and publishes it. A failed publish still uses its
// seq: relays see the gap and take a new snapshot.
func (e *events) publish(ev controlplane.DeviceEvent) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	ev.Epoch, ev.Seq = e.epoch, e.seq
	data, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", ev.Kind, err)
	}
	if err := e.nc.Publish(controlplane.SubjectEvents, data); err != nil {
		return fmt.Errorf("publish %s event %d: %w", ev.Kind, ev.Seq, err)
	}
	return nil
}

// skip uses a seq without publishing: an event was lost, and relays
// must see the gap.
func (e *events) skip() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
}

// last returns the epoch and the seq of the last event published.
func (e *events) last() (string, uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.epoch, e.seq
}

// lockDevice locks the device's events; call the result to unlock.
func (e *events) lockDevice(id string) func() {
	m := &e.devices[maphash.String(e.seed, id)%uint64(len(e.devices))]
	m.Lock()
	return m.Unlock
}

// lockAll locks every device's events, for a change to many devices.
func (e *events) lockAll() func() {
	for i := range e.devices {
		e.devices[i].Lock()
	}
	return func() {
		for i := range e.devices {
			e.devices[i].Unlock()
		}
	}
}
