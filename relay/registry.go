package relay

import (
	"slices"
	"sync"

	"github.com/tetherfleet/tether/controlplane"
)

// route names a service of a device.
type route struct {
	deviceID, service string
}

// registry is the relay's routing table: device → newest live session,
// hostname label → route, TCP port → route.
//
// It opens and closes nothing. Its methods say what changed (the session
// that lost, the ports whose routes moved) and the caller acts on it after
// the lock is released: failing a session and binding a listener are I/O.
type registry struct {
	mu       sync.Mutex
	sessions map[string]*session    // device ID → newest session
	hosts    map[string]route       // hostname label → route, for online devices
	ports    map[uint16]route       // TCP port → route, for online devices
	names    map[string]deviceNames // device ID → its hosts and ports, so dropping them is O(names)
	changed  chan struct{}          // closed and replaced whenever a session leaves
}

// deviceNames are the public names a device's session holds on this relay.
type deviceNames struct {
	hosts []string
	ports []uint16
}

func newRegistry() *registry {
	return &registry{sessions: map[string]*session{}, hosts: map[string]route{},
		ports: map[uint16]route{}, names: map[string]deviceNames{}, changed: make(chan struct{})}
}

// add makes sess the device's session and routes its leases, unless a
// newer generation is live: the newest wins. It returns the session that
// lost (nil if none; sess itself if it is the older one), for the caller
// to fail, and the ports whose routes changed.
func (r *registry) add(sess *session) (loser *session, ports []uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.sessions[sess.deviceID]
	if old != nil && old.generation() > sess.generation() {
		return sess, nil
	}
	r.sessions[sess.deviceID] = sess
	return old, r.routeLocked(sess.deviceID, sess.leases)
}

// update routes a live session's new leases and returns the ports whose
// routes changed. A session that is no longer the device's changes nothing.
func (r *registry) update(sess *session, leases []controlplane.Lease) []uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[sess.deviceID] != sess {
		return nil
	}
	return r.routeLocked(sess.deviceID, leases)
}

// remove forgets sess, unless a newer session replaced it, and returns the
// ports it no longer routes.
func (r *registry) remove(sess *session) []uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[sess.deviceID] != sess {
		return nil
	}
	delete(r.sessions, sess.deviceID)
	ports := r.routeLocked(sess.deviceID, nil)
	delete(r.names, sess.deviceID)
	close(r.changed)
	r.changed = make(chan struct{})
	return ports
}

// routeLocked makes the device's names exactly those of leases and returns
// the ports it gained or lost.
func (r *registry) routeLocked(deviceID string, leases []controlplane.Lease) (changed []uint16) {
	old := r.names[deviceID]
	var names deviceNames
	for _, l := range leases {
		rt := route{deviceID: deviceID, service: l.Service}
		if l.Hostname != "" {
			r.hosts[l.Hostname] = rt
			names.hosts = append(names.hosts, l.Hostname)
		}
		if l.Port != 0 {
			if r.ports[l.Port].deviceID != deviceID {
				changed = append(changed, l.Port)
			}
			r.ports[l.Port] = rt
			names.ports = append(names.ports, l.Port)
		}
	}
	// Drop the names the device no longer holds, unless another device
	// holds them now.
	for _, h := range old.hosts {
		if !slices.Contains(names.hosts, h) && r.hosts[h].deviceID == deviceID {
			delete(r.hosts, h)
		}
	}
	for _, p := range old.ports {
		if !slices.Contains(names.ports, p) && r.ports[p].deviceID == deviceID {
			delete(r.ports, p)
			changed = append(changed, p)
		}
	}
	r.names[deviceID] = names
	return changed
}

// session returns the device's live session, or nil.
func (r *registry) session(deviceID string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[deviceID]
}

// lookupHost returns the session and service serving a hostname label.
func (r *registry) lookupHost(label string) (*session, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.hosts[label]
	if !ok {
		return nil, ""
	}
	return r.sessions[rt.deviceID], rt.service
}

// lookupPort returns the session and service serving a TCP port.
func (r *registry) lookupPort(port uint16) (*session, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.ports[port]
	if !ok {
		return nil, ""
	}
	return r.sessions[rt.deviceID], rt.service
}

// portRoute returns the route of a TCP port, if a live session holds it.
func (r *registry) portRoute(port uint16) (route, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.ports[port]
	return rt, ok
}

// portList returns the TCP ports the live sessions hold.
func (r *registry) portList() []uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]uint16, 0, len(r.ports))
	for p := range r.ports {
		out = append(out, p)
	}
	return out
}

// all returns the live sessions.
func (r *registry) all() []*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*session, 0, len(r.sessions))
	for _, s := range r.sessions {
		out = append(out, s)
	}
	return out
}

// changes returns the number of live sessions and a channel closed at the
// next removal.
func (r *registry) changes() (int, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions), r.changed
}
