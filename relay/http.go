package relay

import (
	"context"
	"errors"
	"fmt"
	"html"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames"
)

// servePublic is the whole route of a public HTTP request through the
// relay, top to bottom:
//
//	Host → hostname label → a session here? → that service's proxy
//	                      → else the replica: device online on relay X → X's forwarding proxy
//
// and an error page wherever the route ends early. A proxy belongs to a
// device session and a service (or, forwarded, to a device and a
// service), so nothing of the route travels in the request's context or
// in a made-up URL.
func (s *Server) servePublic(w http.ResponseWriter, r *http.Request, scheme string) {
	label, ok := s.label(r.Host)
	if !ok || s.ownName(r.Host) {
		s.errorPage(w, http.StatusNotFound, "unknown_host", "Unknown host",
			fmt.Sprintf("No Tether service is published at %s. Service hostnames look like SERVICE-DEVICE.%s.", r.Host, s.cfg.Domain))
		return
	}
	s.limitBody(w, r)
	w, done := s.limitResponse(w)
	defer done()
	if sess, service := s.reg.lookupHost(label); sess != nil && !s.isRevoked(sess.deviceID) {
		release, ok := s.clientSlot(w, r, sess.deviceID, sess.name)
		if !ok {
			return
		}
		defer release()
		s.metrics.httpRequests.WithLabelValues(scheme).Inc()
		sess.proxy(service).ServeHTTP(w, r)
		return
	}
	s.serveElsewhere(w, r, label, scheme)
}

// label returns the first label of host when host is a direct subdomain
// of the relay's domain: the name of a lease.
func (s *Server) label(host string) (string, bool) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	label, ok := strings.CutSuffix(host, "."+s.cfg.Domain)
	if !ok || label == "" || strings.Contains(label, ".") {
		return "", false
	}
	return label, true
}

// serveElsewhere serves a hostname that no session here holds, from the
// replica: forwarded to the relay holding the device, or the page that
// says why not (unknown, revoked, offline). This relay's own presence in
// the replica is never trusted over its routing table.
func (s *Server) serveElsewhere(w http.ResponseWriter, r *http.Request, label, scheme string) {
	host := s.Hostname(label)
	rec, lease, ok := s.replica.ByHostname(label)
	if !ok {
		s.metrics.replicaLookups.WithLabelValues("miss").Inc()
		s.errorPage(w, http.StatusNotFound, "unknown_host", "Unknown host", fmt.Sprintf("No Tether service is published at %s.", host))
		return
	}
	s.metrics.replicaLookups.WithLabelValues("hit").Inc()
	switch {
	case s.isRevoked(rec.ID):
		s.errorPage(w, http.StatusServiceUnavailable, "revoked", "Device revoked",
			fmt.Sprintf("Device %s was revoked by the operator, so its service %s at %s is no longer served.", rec.Name, lease.Service, host))
	case lease.Online && lease.Relay == s.cfg.RelayID:
		// Registered a moment ago or leaving right now: the client may retry.
		s.errorPage(w, http.StatusServiceUnavailable, "offline", "Device reconnecting",
			fmt.Sprintf("Device %s is reconnecting; try again in a moment.", rec.Name))
	case !lease.Online:
		s.errorPage(w, http.StatusServiceUnavailable, "offline", "Device offline",
			fmt.Sprintf("Device %s is offline, so its service %s at %s cannot be reached. It is served again as soon as the device reconnects.", rec.Name, lease.Service, host))
	case s.peer == nil:
		s.errorPage(w, http.StatusBadGateway, "other_relay", "Device on another relay",
			fmt.Sprintf("Device %s is connected to relay %s, and this relay has no cluster listener to forward to it.", rec.Name, lease.Relay))
	default:
		release, ok := s.clientSlot(w, r, rec.ID, rec.Name)
		if !ok {
			return
		}
		defer release()
		s.metrics.httpRequests.WithLabelValues(scheme).Inc()
		s.forwarder(rec.ID, rec.Name, lease.Service).ServeHTTP(w, r)
	}
}

// errorPage writes a small HTML page naming the problem.
func (s *Server) errorPage(w http.ResponseWriter, status int, reason, title, msg string) {
	s.metrics.httpErrors.WithLabelValues(reason).Inc()
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Tether-Error", reason)
	w.WriteHeader(status)
	fmt.Fprintf(w, "<!doctype html><html><head><meta charset=utf-8><title>%d %s</title></head>"+
		"<body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>%s</h1><p>%s</p><hr><small>Tether relay %s · HTTP %d</small></body></html>\n",
		status, html.EscapeString(title), html.EscapeString(title), html.EscapeString(msg), html.EscapeString(s.cfg.RelayID), status)
}

// serviceProxy is the reverse proxy to one service of a device. Its
// transport's connections are data streams for that service (through a
// peer relay when forwarded), and idle ones are kept for reuse (up to
// MaxIdleStreams).
type serviceProxy struct {
	*httputil.ReverseProxy
	transport *http.Transport
}

// upstream is where a serviceProxy's connections go.
type upstream struct {
	device, service string
	// dial opens a data stream to the service and waits for the agent's
	// answer, so that a refusal is a clear dial error; pooled streams pay
	// this round trip only once.
	dial func(ctx context.Context) (net.Conn, error)
	// gone reports whether the device's session here ended; nil for a
	// forwarded service.
	gone func() bool
}

// newServiceProxy builds the proxy of a device's service: it keeps the
// public Host, sets X-Forwarded-* (X-Forwarded-For is the public client's
// address, also when forwarded through a peer relay), streams responses
// unbuffered and upgrades WebSockets (ReverseProxy's own handling).
func (s *Server) newServiceProxy(up upstream) *serviceProxy {
	tr := &http.Transport{
		// The address is the public Host (see Rewrite), which only keys the
		// pool: every connection of this transport goes to this service.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := up.dial(ctx)
			if err != nil {
				return nil, err
			}
			return closeIdle(c, s.cfg.Public.StreamIdleTimeout, nil), nil
		},
		ResponseHeaderTimeout: s.cfg.Public.ResponseHeaderTimeout,
		MaxIdleConnsPerHost:   s.cfg.MaxIdleStreams,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		ExpectContinueTimeout: time.Second,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&url.URL{Scheme: "http", Host: pr.In.Host})
			pr.Out.Host = pr.In.Host
			setForwarded(pr) // X-Forwarded-*, Forwarded; client-set ones dropped (forwarded.go)
			// The dial learns which request it is made for (requestOf).
			pr.Out = pr.Out.WithContext(context.WithValue(pr.Out.Context(), dialingFor{}, pr.Out.Context()))
		},
		Transport: tr,
		// Zero: ReverseProxy itself flushes at once for text/event-stream and
		// for bodies of unknown length (streaming), and lets a known-length
		// body go out without a flush per write (-1 cost a syscall per write).
		FlushInterval: 0,
		BufferPool:    copyBuffers{},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.proxyError(w, r, err, up)
		},
	}
	return &serviceProxy{ReverseProxy: rp, transport: tr}
}

// dialingFor keys, in the context of a proxied request, that request's
// own context.
type dialingFor struct{}

// requestOf returns the context of the request a transport's dial was made
// for, or ctx. net/http detaches a dial from its request's cancellation
// (a later request may use the connection) but keeps its values.
func requestOf(ctx context.Context) context.Context {
	if rc, ok := ctx.Value(dialingFor{}).(context.Context); ok {
		return rc
	}
	return ctx
}

// dialHTTP opens a data stream to service for the HTTP transport and
// waits for the agent's answer. It gives up as soon as the request it is
// made for is gone: net/http would finish the dial anyway, outside the
// client's cap (MaxStreamsPerClient), and a client cancelling its requests
// at once (HTTP/2 rapid reset) could fill the session with such dials.
func (sess *session) dialHTTP(ctx context.Context, service string) (net.Conn, error) {
	rc := requestOf(ctx)
	if err := rc.Err(); err != nil {
		return nil, err
	}
	c, err := sess.openStream(service, "")
	if err != nil {
		return nil, err
	}
	gone := context.AfterFunc(rc, func() { c.Close() })
	if err := c.awaitAnswer(); err != nil {
		c.Close()
		return nil, err
	}
	if !gone() { // the request went while the agent answered: closed
		return nil, context.Cause(rc)
	}
	return c, nil
}

// copyBuffers lends ReverseProxy its 32 KB copy buffers from a pool
// instead of allocating one per response.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (copyBuffers) Get() []byte  { return *copyBufferPool.Get().(*[]byte) }
func (copyBuffers) Put(b []byte) { copyBufferPool.Put(&b) }

// proxyError answers a request the device's service could not serve with
// the page that names why.
func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, err error, up upstream) {
	var refused *RefusedError
	var fwd *forwardError
	switch {
	case r.Context().Err() != nil:
		// The public client went away; nobody reads an answer.
		s.metrics.httpErrors.WithLabelValues("client_gone").Inc()
	case errors.As(err, &refused) && refused.Refuse.Code == frames.CodeDialFailed:
		s.errorPage(w, http.StatusBadGateway, "service_refused", "Service unreachable on the device",
			fmt.Sprintf("Device %s is online, but its service %s did not accept the connection (%s).", up.device, up.service, refused.Refuse.Message))
	case errors.As(err, &refused) && refused.Refuse.Code == frames.CodeRevoked:
		s.errorPage(w, http.StatusServiceUnavailable, "revoked", "Device revoked",
			fmt.Sprintf("Device %s was revoked by the operator, so its service %s is no longer served.", up.device, up.service))
	case errors.As(err, &refused) && refused.Refuse.Code == frames.CodeTooManyStreams:
		s.errorPage(w, http.StatusServiceUnavailable, "too_many_streams", "Device busy",
			fmt.Sprintf("Device %s has too many open connections; try again shortly.", up.device))
	case errors.As(err, &refused):
		s.errorPage(w, http.StatusBadGateway, "stream_refused", "Device refused the connection",
			fmt.Sprintf("Device %s refused a connection to service %s: %s.", up.device, up.service, refused.Refuse))
	case errors.Is(err, errTooManyStreams):
		s.errorPage(w, http.StatusServiceUnavailable, "too_many_streams", "Device busy",
			fmt.Sprintf("Device %s has too many open connections; try again shortly.", up.device))
	case isTimeout(err):
		s.errorPage(w, http.StatusGatewayTimeout, "device_timeout", "Device did not answer in time",
			fmt.Sprintf("Service %s of device %s did not answer within %v.", up.service, up.device, s.cfg.Public.ResponseHeaderTimeout))
	case errors.As(err, &fwd) && len(fwd.unreachable) == 0:
		s.errorPage(w, http.StatusServiceUnavailable, "offline", "Device reconnecting",
			fmt.Sprintf("Device %s is not connected to any relay right now (it is moving, or went offline); try again in a moment.", up.device))
	case errors.As(err, &fwd):
		s.errorPage(w, http.StatusBadGateway, "relay_unreachable", "Relay unreachable",
			fmt.Sprintf("Device %s is connected to relay %s, which this relay cannot reach (%s).", up.device, fwd.holder, fwd.why()))
	case up.gone != nil && up.gone():
		s.errorPage(w, http.StatusBadGateway, "offline", "Device went offline",
			fmt.Sprintf("Device %s disconnected while serving this request.", up.device))
	default:
		s.log.Info("proxy to device failed", "device", up.device, "service", up.service, "err", err)
		s.errorPage(w, http.StatusBadGateway, "bad_gateway", "Bad gateway",
			fmt.Sprintf("The connection to service %s of device %s failed.", up.service, up.device))
	}
}

// isTimeout reports whether err is a timeout (the device's response
// header did not come in time).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
