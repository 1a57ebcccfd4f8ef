package relay

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

// route names a service of a device.
type route struct {
	deviceID, service string
}

// registry maps devices to their newest live session, and public names
// (HTTP hostname labels, TCP ports) to routes.
type registry struct {
	srv *Server

	mu       sync.Mutex
	sessions map[string]*session // device ID → newest session
	hosts    map[string]route    // hostname label → route, for online devices
	ports    map[uint16]*portListener
	names    map[string]deviceNames // device ID → its hosts and ports, so dropping them is O(names)
	changed  chan struct{}          // closed and replaced whenever a session leaves
}

// deviceNames are the public names a device's session holds on this relay.
type deviceNames struct {
	hosts []string
	ports []uint16
}

func newRegistry(s *Server) *registry {
	return &registry{srv: s, sessions: map[string]*session{}, hosts: map[string]route{},
		ports: map[uint16]*portListener{}, names: map[string]deviceNames{}, changed: make(chan struct{})}
}

// add makes sess the device's session: the newest generation wins and the
// older session is closed at once.
func (r *registry) add(sess *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.sessions[sess.deviceID]; old != nil {
		if old.gen > sess.gen {
			sess.fail(frames.CodeSuperseded, "a newer session of this device is live")
			return
		}
		old.fail(frames.CodeSuperseded, "superseded by a newer session of this device")
	}
	r.sessions[sess.deviceID] = sess
	r.applyLocked(sess, sess.leases)
}

// update applies a live session's new leases.
func (r *registry) update(sess *session, leases []controlplane.Lease) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[sess.deviceID] == sess {
		r.applyLocked(sess, leases)
	}
}

func (r *registry) applyLocked(sess *session, leases []controlplane.Lease) {
	old := r.names[sess.deviceID]
	var names deviceNames
	for _, l := range leases {
		rt := route{deviceID: sess.deviceID, service: l.Service}
		if l.Hostname != "" {
			r.hosts[l.Hostname] = rt
			names.hosts = append(names.hosts, l.Hostname)
		}
		if l.Port != 0 {
			r.listenLocked(l.Port, rt) // keeps a listener the device already had
			names.ports = append(names.ports, l.Port)
		}
	}
	// Drop the names the device no longer holds.
	for _, h := range old.hosts {
		if !slices.Contains(names.hosts, h) && r.hosts[h].deviceID == sess.deviceID {
			delete(r.hosts, h)
		}
	}
	for _, p := range old.ports {
		if !slices.Contains(names.ports, p) {
			r.closePortLocked(p, sess.deviceID)
		}
	}
	r.names[sess.deviceID] = names
}

// dropNamesLocked removes a device's names.
func (r *registry) dropNamesLocked(deviceID string) {
	names := r.names[deviceID]
	for _, h := range names.hosts {
		if r.hosts[h].deviceID == deviceID {
			delete(r.hosts, h)
		}
	}
	for _, p := range names.ports {
		r.closePortLocked(p, deviceID)
	}
	delete(r.names, deviceID)
}

func (r *registry) closePortLocked(p uint16, deviceID string) {
	if pl, ok := r.ports[p]; ok && pl.route.deviceID == deviceID {
		pl.close()
		delete(r.ports, p)
	}
}

// remove forgets sess unless a newer session replaced it.
func (r *registry) remove(sess *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[sess.deviceID] != sess {
		return
	}
	delete(r.sessions, sess.deviceID)
	r.dropNamesLocked(sess.deviceID)
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *registry) session(deviceID string) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[deviceID]
}

// lookup returns the session and service serving a hostname label.
func (r *registry) lookup(label string) (*session, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.hosts[label]
	if !ok {
		return nil, ""
	}
	return r.sessions[rt.deviceID], rt.service
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

// portListener accepts public TCP connections for one leased port.
type portListener struct {
	ln    net.Listener
	route route
	once  sync.Once
}

func (p *portListener) close() { p.once.Do(func() { p.ln.Close() }) }

// listenLocked starts the listener of a TCP lease. A port that cannot be
// bound is logged and counted; the lease stays valid on other relays.
func (r *registry) listenLocked(port uint16, rt route) {
	if pl, ok := r.ports[port]; ok {
		pl.route = rt
		return
	}
	s := r.srv
	addr := net.JoinHostPort(s.cfg.TCPHost, strconv.Itoa(int(port)))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		s.metrics.tcpListenErrors.Inc()
		s.log.Error("cannot listen for TCP lease", "addr", addr, "device_id", rt.deviceID, "service", rt.service, "err", err)
		return
	}
	pl := &portListener{ln: ln, route: rt}
	r.ports[port] = pl
	stop := context.AfterFunc(s.ctx, pl.close)
	s.wg.Go(func() {
		s.acceptTCP(pl)
		stop()
	})
}

// portRoute returns the session and service a port listener serves now.
func (r *registry) portRoute(pl *portListener) (*session, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sessions[pl.route.deviceID], pl.route.service
}

// acceptTCP serves one TCP lease until its listener closes, backing off on
// temporary errors.
func (s *Server) acceptTCP(pl *portListener) {
	var delay time.Duration
	for {
		c, err := pl.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, 10*time.Millisecond), time.Second)
			s.log.Warn("accept TCP", "addr", pl.ln.Addr(), "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.wg.Go(func() { s.serveTCP(c, pl) })
	}
}
