package relay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/splice"
	"github.com/tetherfleet/tether/relay/peer"
)

// Forwarding: a public connection for a device whose agent another relay
// holds goes to that relay over the peer transport (package peer), which
// carries it on to the agent. The holding relay answers as the agent
// does, or with not_here; see relay/cluster.md.

const (
	// answerTimeout bounds the wait for the answer to a forwarded stream
	// (the agent's, passed on, or the holding relay's).
	answerTimeout = 30 * time.Second
	// maxForwarders bounds the forwarding proxies kept, one per device
	// service reached through a peer.
	maxForwarders = 4096
)

// servePeer serves a stream a peer relay opened: it carries it on to the
// device's agent if its session is here (the agent's answer goes back
// unchanged), and otherwise answers not_here, so the peer tries another
// relay.
func (s *Server) servePeer(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
	sess := s.reg.session(open.DeviceID)
	var refuse *frames.StreamRefuse
	switch {
	case sess == nil:
		refuse = &frames.StreamRefuse{Code: frames.CodeNotHere, Message: fmt.Sprintf("relay %s does not hold device %s", s.cfg.RelayID, open.DeviceID)}
	case s.isRevoked(open.DeviceID):
		refuse = &frames.StreamRefuse{Code: frames.CodeRevoked, Message: fmt.Sprintf("device %s was revoked", sess.name)}
	}
	var c *streamConn
	if refuse == nil {
		var err error
		if c, err = sess.openStream(open.Service, open.ClientAddr); errors.Is(err, errTooManyStreams) {
			refuse = &frames.StreamRefuse{Code: frames.CodeTooManyStreams, Message: err.Error()}
		} else if err != nil {
			refuse = &frames.StreamRefuse{Code: frames.CodeNotHere, Message: fmt.Sprintf("relay %s: device %s is leaving: %v", s.cfg.RelayID, sess.name, err)}
		}
	}
	if refuse != nil {
		frames.WriteTimeout(st, refuse, writeTimeout)
		return
	}
	c.passAnswer() // the agent's answer is the peer's to read
	// The idle timeout the service asked for, which the relay the client
	// reached does not know: closing the peer stream closes the client.
	res := splice.Splice(s.closeIdleTCP(st, sess.idleFor(open.Service)), c)
	s.metrics.bytes.WithLabelValues("from_peer").Add(float64(res.AToB))
	s.metrics.bytes.WithLabelValues("to_peer").Add(float64(res.BToA))
}

// forwardError says why no relay carried a forwarded stream: the relay
// that holds the device per the replica, the relays that answered they do
// not hold it, and those that could not be reached.
type forwardError struct {
	device, holder string
	notHere        []string
	unreachable    map[string]error
}

func (e *forwardError) Error() string {
	return fmt.Sprintf("forward to device %s (held by relay %s): %s", e.device, e.holder, e.why())
}

// why lists what each relay tried did.
func (e *forwardError) why() string {
	var parts []string
	for _, id := range slices.Sorted(maps.Keys(e.unreachable)) {
		parts = append(parts, fmt.Sprintf("relay %s unreachable: %v", id, e.unreachable[id]))
	}
	if len(e.notHere) > 0 {
		parts = append(parts, "not held by relay "+strings.Join(e.notHere, ", "))
	}
	return cmp.Or(strings.Join(parts, "; "), "no live relay to try")
}

// dialPeer opens a stream to service of device rec through the relay the
// replica says holds it and returns it once the agent accepted it (the
// client's first bytes must not go to a relay that may answer not_here).
// A relay that answers not_here, or cannot be reached, is followed by
// each other live peer, once. An agent's refusal is a *RefusedError.
func (s *Server) dialPeer(ctx context.Context, rec controlplane.DeviceRecord, service, client string) (net.Conn, error) {
	peers := s.Peers()
	fe := &forwardError{device: rec.Name, holder: rec.Relay, unreachable: map[string]error{}}
	order := slices.Sorted(maps.Keys(peers))
	if i := slices.Index(order, rec.Relay); i > 0 {
		order = append(append([]string{rec.Relay}, order[:i]...), order[i+1:]...)
	} else if i < 0 && rec.Relay != "" && rec.Relay != s.cfg.RelayID {
		fe.unreachable[rec.Relay] = errors.New("not a live relay of the cluster")
		s.metrics.forwardFailures.WithLabelValues("unreachable").Inc()
	}
	open := &frames.PeerOpen{DeviceID: rec.ID, Service: service, ClientAddr: client}
	for _, id := range order {
		st, answer, err := s.openPeer(ctx, id, peers[id], open)
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return nil, fmt.Errorf("forward to device %s: %w", rec.Name, context.Cause(ctx))
			}
			s.metrics.forwardFailures.WithLabelValues("unreachable").Inc()
			fe.unreachable[id] = err
		case answer == nil:
			s.metrics.forwarded.WithLabelValues(id).Inc()
			return st, nil
		case answer.Code == frames.CodeNotHere:
			s.metrics.forwardFailures.WithLabelValues("not_here").Inc()
			fe.notHere = append(fe.notHere, id)
		default:
			s.metrics.forwardFailures.WithLabelValues("refused").Inc()
			return nil, &RefusedError{Device: rec.Name, Service: service, Refuse: answer}
		}
	}
	return nil, fe
}

// openPeer opens a stream through relay id and reads its answer: nil for
// an accepted stream (returned open), or the refusal (the stream closed).
func (s *Server) openPeer(ctx context.Context, id, addr string, open *frames.PeerOpen) (net.Conn, *frames.StreamRefuse, error) {
	st, err := s.peer.Open(ctx, id, addr, open)
	if err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(answerTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	st.SetReadDeadline(deadline)
	m, err := frames.Read(st, 4096)
	st.SetReadDeadline(time.Time{})
	switch m := m.(type) {
	case *frames.StreamAccept:
		return st, nil, nil
	case *frames.StreamRefuse:
		st.Close()
		return nil, m, nil
	default:
		st.Close()
		if err == nil {
			err = fmt.Errorf("unexpected %v frame", m.Type())
		}
		return nil, nil, fmt.Errorf("answer from relay %s: %w", id, err)
	}
}

// forwarder returns the proxy to a device's service through peer relays,
// building it on first use. Its connections find the holding relay when
// they are dialled, from the replica.
func (s *Server) forwarder(deviceID, name, service string) *serviceProxy {
	key := deviceID + "/" + service
	s.fmu.Lock()
	defer s.fmu.Unlock()
	if p, ok := s.forwarders[key]; ok {
		return p
	}
	if len(s.forwarders) >= maxForwarders {
		for _, p := range s.forwarders {
			p.transport.CloseIdleConnections()
		}
		clear(s.forwarders) // bound memory; a proxy is cheap to build again
	}
	p := s.newServiceProxy(upstream{device: name, service: service, dial: func(ctx context.Context) (net.Conn, error) {
		rec, ok := s.replica.Device(deviceID)
		if !ok {
			return nil, &forwardError{device: name}
		}
		return s.dialPeer(ctx, rec, service, "")
	}})
	s.forwarders[key] = p
	return p
}

// forgetPeer drops the session to a peer relay that left the cluster or
// moved; the next stream to it dials again.
func (s *Server) forgetPeer(id string) {
	if s.peer != nil {
		s.peer.Forget(id)
	}
}

// ServePeers serves the peer relays' streams on ln (the cluster
// listener) until ctx ends or the relay stops. Without a peer
// certificate (Config.PeerCert) it refuses.
func (s *Server) ServePeers(ctx context.Context, ln net.Listener) error {
	if s.peer == nil {
		ln.Close()
		return errors.New("relay: no peer certificate: cannot serve peers")
	}
	return s.peer.Serve(ctx, ln)
}

// newPeerTransport makes the relay's peer transport, or nil without a
// peer certificate.
func (s *Server) newPeerTransport() (*peer.Transport, error) {
	if s.cfg.PeerCert == nil {
		return nil, nil
	}
	if s.cfg.PeerRoots == nil {
		return nil, errors.New("relay: PeerRoots is required with PeerCert")
	}
	t, err := peer.New(peer.Config{
		RelayID: s.cfg.RelayID, Cert: *s.cfg.PeerCert, Roots: s.cfg.PeerRoots, Handler: s.servePeer,
		MaxStreams: s.cfg.MaxPeerStreams, Logger: s.log.With("component", "peer"), Registerer: s.cfg.Registerer,
	})
	if err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	return t, nil
}

// closeForwarders drops the idle connections of every forwarding proxy.
func (s *Server) closeForwarders() {
	s.fmu.Lock()
	defer s.fmu.Unlock()
	for _, p := range s.forwarders {
		p.transport.CloseIdleConnections()
	}
	clear(s.forwarders)
}
