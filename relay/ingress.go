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
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/splice"
)

type routeKey struct{}

// proxyRoute travels in a proxied request's context.
type proxyRoute struct {
	sess    *session
	service string
}

// servePublic routes a public HTTP request by its Host.
func (s *Server) servePublic(w http.ResponseWriter, r *http.Request, scheme, label string, under bool) {
	if !under {
		s.errorPage(w, http.StatusNotFound, "unknown_host", "Unknown host",
			fmt.Sprintf("No Tether service is published at %s. Service hostnames look like SERVICE-DEVICE.%s.", r.Host, s.cfg.Domain))
		return
	}
	sess, service := s.reg.lookup(label)
	if sess == nil {
		s.serveAbsent(w, r, label)
		return
	}
	ctx := context.WithValue(r.Context(), routeKey{}, &proxyRoute{sess: sess, service: service})
	s.metrics.httpRequests.WithLabelValues(scheme).Inc()
	s.proxy.ServeHTTP(w, r.WithContext(ctx))
}

// serveAbsent answers for a hostname no local session serves: unknown,
// offline, or served elsewhere.
func (s *Server) serveAbsent(w http.ResponseWriter, r *http.Request, label string) {
	host := s.Hostname(label)
	l, err := s.cp.Lookup(r.Context(), controlplane.LookupRequest{Hostname: label})
	switch {
	case controlplane.KindOf(err) == controlplane.KindNotFound:
		s.errorPage(w, http.StatusNotFound, "unknown_host", "Unknown host", fmt.Sprintf("No Tether service is published at %s.", host))
	case err != nil:
		s.log.Warn("look up hostname", "host", host, "err", err)
		s.errorPage(w, http.StatusServiceUnavailable, "control_plane", "Temporarily unavailable",
			fmt.Sprintf("The relay cannot reach its control plane to find %s. Try again shortly.", host))
	case l.Online && l.Relay != s.cfg.RelayID:
		s.errorPage(w, http.StatusBadGateway, "other_relay", "Device on another relay",
			fmt.Sprintf("Device %s is connected to relay %s, and this relay does not forward to other relays yet.", l.DeviceName, l.Relay))
	case l.Online:
		// Registered a moment ago or leaving right now: the client may retry.
		s.errorPage(w, http.StatusServiceUnavailable, "offline", "Device reconnecting",
			fmt.Sprintf("Device %s is reconnecting; try again in a moment.", l.DeviceName))
	default:
		s.errorPage(w, http.StatusServiceUnavailable, "offline", "Device offline",
			fmt.Sprintf("Device %s is offline, so its service %s at %s cannot be reached. It is served again as soon as the device reconnects.", l.DeviceName, l.Service, host))
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

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// newProxy returns the reverse proxy of public HTTP: it keeps the public
// Host, sets X-Forwarded-*, streams responses unbuffered and sends each
// request through its device session's pool of streams.
func (s *Server) newProxy() http.Handler {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			rt := pr.In.Context().Value(routeKey{}).(*proxyRoute)
			pr.SetURL(&url.URL{Scheme: "http", Host: rt.service})
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			return r.Context().Value(routeKey{}).(*proxyRoute).sess.http.RoundTrip(r)
		}),
		// Zero: ReverseProxy itself flushes at once for text/event-stream and
		// for bodies of unknown length (streaming), and lets a known-length
		// body go out without a flush per write (-1 cost a syscall per write).
		FlushInterval: 0,
		BufferPool:    copyBuffers{},
		ErrorHandler:  s.proxyError,
	}
}

// copyBuffers lends ReverseProxy its 32 KB copy buffers from a pool
// instead of allocating one per response.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (copyBuffers) Get() []byte  { return *copyBufferPool.Get().(*[]byte) }
func (copyBuffers) Put(b []byte) { copyBufferPool.Put(&b) }

func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	rt := r.Context().Value(routeKey{}).(*proxyRoute)
	var refused *RefusedError
	switch {
	case r.Context().Err() != nil:
		// The public client went away; nobody reads an answer.
		s.metrics.httpErrors.WithLabelValues("client_gone").Inc()
	case errors.As(err, &refused) && refused.Refuse.Code == frames.CodeDialFailed:
		s.errorPage(w, http.StatusBadGateway, "service_refused", "Service unreachable on the device",
			fmt.Sprintf("Device %s is online, but its service %s did not accept the connection (%s).", rt.sess.name, rt.service, refused.Refuse.Message))
	case errors.As(err, &refused):
		s.errorPage(w, http.StatusBadGateway, "stream_refused", "Device refused the connection",
			fmt.Sprintf("Device %s refused a connection to service %s: %s.", rt.sess.name, rt.service, refused.Refuse))
	case errors.Is(err, errTooManyStreams):
		s.errorPage(w, http.StatusServiceUnavailable, "too_many_streams", "Device busy",
			fmt.Sprintf("Device %s has too many open connections; try again shortly.", rt.sess.name))
	case isSessionClosed(rt.sess):
		s.errorPage(w, http.StatusBadGateway, "offline", "Device went offline",
			fmt.Sprintf("Device %s disconnected while serving this request.", rt.sess.name))
	default:
		s.log.Info("proxy to device failed", "device", rt.sess.name, "service", rt.service, "err", err)
		s.errorPage(w, http.StatusBadGateway, "bad_gateway", "Bad gateway",
			fmt.Sprintf("The connection to service %s of device %s failed.", rt.service, rt.sess.name))
	}
}

func isSessionClosed(sess *session) bool {
	select {
	case <-sess.closed:
		return true
	default:
		return sess.mux.IsClosed()
	}
}

// newStreamTransport returns the HTTP transport to one device: each
// connection is a data stream, and idle ones are kept for reuse.
func (s *Server) newStreamTransport(sess *session) *http.Transport {
	return &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			service, _, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			c, err := sess.openStream(service, "")
			if err != nil {
				return nil, err
			}
			// HTTP waits for the answer so that a refusal is a clear dial
			// error; pooled streams pay this round trip only once.
			if err := c.awaitAnswer(); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		},
		MaxIdleConnsPerHost:   s.cfg.MaxIdleStreams,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		ExpectContinueTimeout: time.Second,
	}
}

// serveTCP splices one public TCP connection to a stream. The client's
// bytes follow the stream header at once; the agent's answer is read
// before any byte goes back.
func (s *Server) serveTCP(c net.Conn, pl *portListener) {
	sess, service := s.reg.portRoute(pl)
	if sess == nil {
		c.Close()
		return
	}
	s.metrics.tcpConns.Inc()
	st, err := sess.openStream(service, c.RemoteAddr().String())
	if err != nil {
		s.log.Info("open TCP stream", "device", sess.name, "service", service, "err", err)
		c.Close()
		return
	}
	res := splice.Splice(c, st)
	s.metrics.bytes.WithLabelValues("to_device").Add(float64(res.AToB))
	s.metrics.bytes.WithLabelValues("from_device").Add(float64(res.BToA))
	var refused *RefusedError
	if errors.As(res.Err, &refused) {
		s.log.Info("TCP connection refused by device", "device", sess.name, "service", service, "reason", refused.Refuse)
	}
}
