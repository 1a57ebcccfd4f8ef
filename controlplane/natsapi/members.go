package natsapi

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
)

// maxRelays bounds the membership table.
const maxRelays = 1024

// forgetLost is how long a relay that fell silent is remembered as lost.
const forgetLost = 24 * time.Hour

// members is the table of live relays, in memory: a relay is live from
// its hello until it has been silent for three hello intervals. Then it
// is lost (it may still hold sessions, cut off from NATS) until it says
// hello again, is reset (it restarted: it holds none), or forgetLost
// passes.
type members struct {
	interval time.Duration

	mu     sync.Mutex
	relays map[string]controlplane.RelayInfo
	lost   map[string]time.Time // relay ID → when it was declared down
	// graceUntil: no relay is declared down before this time. Set when
	// the control plane itself was cut off from NATS, since then nobody's
	// hello could reach it.
	graceUntil time.Time
}

func newMembers(interval time.Duration) *members {
	return &members{interval: interval, relays: map[string]controlplane.RelayInfo{}, lost: map[string]time.Time{}}
}

// hello records a relay's hello at now and returns the live relays.
func (m *members) hello(req controlplane.HelloRequest, now time.Time) ([]controlplane.RelayInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.relays[req.RelayID]; !ok && len(m.relays) >= maxRelays {
		return nil, controlplane.Errorf(controlplane.KindConflict, "too many relays (%d): relay %s is not admitted", maxRelays, req.RelayID)
	}
	delete(m.lost, req.RelayID)
	m.relays[req.RelayID] = controlplane.RelayInfo{
		ID: req.RelayID, ClusterAddr: req.ClusterAddr, PublicNames: slices.Clone(req.PublicNames),
		Sessions: req.Sessions, UnboundPorts: slices.Clone(req.UnboundPorts), BusyPorts: slices.Clone(req.BusyPorts), LastSeen: now,
	}
	return m.listLocked(), nil
}

// live returns the live relays, by ID.
func (m *members) live() []controlplane.RelayInfo {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.listLocked()
}

func (m *members) listLocked() []controlplane.RelayInfo {
	out := make([]controlplane.RelayInfo, 0, len(m.relays))
	for _, r := range m.relays {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b controlplane.RelayInfo) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// lostRelays returns the relays lost at now, by ID.
func (m *members) lostRelays(now time.Time) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for id, at := range m.lost {
		if now.Sub(at) >= forgetLost {
			delete(m.lost, id)
			continue
		}
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// reset notes that a relay restarted or stopped: it holds no sessions,
// so it is not lost.
func (m *members) reset(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.lost, id)
}

// cutOff notes that the control plane could not hear hellos until now:
// every relay gets three intervals from now to say hello again.
func (m *members) cutOff(now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.graceUntil = now.Add(3 * m.interval)
}

// expire removes and returns the relays silent for three intervals at now.
func (m *members) expire(now time.Time) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if now.Before(m.graceUntil) {
		return nil
	}
	var down []string
	for id, r := range m.relays {
		if now.Sub(r.LastSeen) >= 3*m.interval {
			down = append(down, id)
			delete(m.relays, id)
			m.lost[id] = now
		}
	}
	slices.Sort(down)
	return down
}

// portBusy reports whether a live relay reports port as held by another
// process of its host (HelloRequest.BusyPorts).
func (m *members) portBusy(port uint16) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range m.relays {
		if _, found := slices.BinarySearch(r.BusyPorts, port); found {
			return true
		}
	}
	return false
}
