package relay

import (
	"bufio"
	"cmp"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// The public edge's limits: what a public client (anyone on the internet)
// may hold of a relay and of a device, and for how long. Every limit has a
// default; relay/cmd/tether-relay sets them from TETHER_PUBLIC_*.

// PublicLimits bounds public clients. Zero fields mean the defaults.
type PublicLimits struct {
	// HeaderTimeout bounds reading a request's header. Zero means 10s.
	HeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive connection with no request for this
	// long. Zero means 60s.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's header. Zero means 64 KiB.
	MaxHeaderBytes int
	// BodyMinRate is the slowest a request body may arrive, in bytes per
	// second on average, after a grace of BodyGrace: a client that
	// trickles is cut off. Zero means 1024.
	BodyMinRate int
	// BodyGrace is how long a request body may take before BodyMinRate
	// applies. Zero means 10s.
	BodyGrace time.Duration
	// ResponseHeaderTimeout bounds the wait for a device's response
	// header: a client gets 504 instead of waiting for ever. Zero means 60s.
	ResponseHeaderTimeout time.Duration
	// StreamIdleTimeout closes a connection to a device's HTTP service
	// with no byte either way for this long: an upgraded one (WebSocket),
	// a streamed response, an idle pooled one. Zero means 100s; it is
	// raised to ResponseHeaderTimeout + 1s if below.
	StreamIdleTimeout time.Duration
	// TCPIdleTimeout closes a TCP lease connection with no byte either
	// way for this long, whatever its service asks: it is a ceiling over
	// the idle timeout an agent may ask per service (?idle=), and the
	// timeout of services that ask none. Zero means no ceiling: only the
	// services that ask are closed when idle (an SSH session may sit idle).
	TCPIdleTimeout time.Duration
	// H2MaxStreams caps the concurrent requests of one HTTP/2
	// connection. Zero means 100.
	H2MaxStreams int
	// ResponseMinRate is the slowest a public client may take what the
	// device sends (responses, WebSocket and TCP-lease data): each write
	// must be taken within ResponseGrace plus its length at this rate, in
	// bytes per second, or the client is cut off, so that its stream's
	// buffered data does not hold the device's session up. Zero means 4096.
	ResponseMinRate int
	// ResponseGrace is how long a client may take before ResponseMinRate
	// applies. Zero means 5s.
	ResponseGrace time.Duration
	// MaxStreamsPerClient caps the connections (HTTP requests in flight,
	// WebSockets, TCP connections) one client address holds to one device
	// at once, so that nobody takes a device's whole stream cap: beyond
	// it, HTTP gets 429 and TCP is closed. Zero means 64.
	MaxStreamsPerClient int
}

func (l PublicLimits) withDefaults() PublicLimits {
	l.HeaderTimeout = cmp.Or(l.HeaderTimeout, 10*time.Second)
	l.IdleTimeout = cmp.Or(l.IdleTimeout, 60*time.Second)
	l.MaxHeaderBytes = cmp.Or(l.MaxHeaderBytes, 64<<10)
	l.BodyMinRate = cmp.Or(l.BodyMinRate, 1024)
	l.BodyGrace = cmp.Or(l.BodyGrace, 10*time.Second)
	l.ResponseHeaderTimeout = cmp.Or(l.ResponseHeaderTimeout, 60*time.Second)
	// A device working on its answer is not idle: the response header
	// timeout ends that wait, with its own page.
	l.StreamIdleTimeout = max(cmp.Or(l.StreamIdleTimeout, 100*time.Second), l.ResponseHeaderTimeout+time.Second)
	l.H2MaxStreams = cmp.Or(l.H2MaxStreams, 100)
	l.MaxStreamsPerClient = cmp.Or(l.MaxStreamsPerClient, 64)
	l.ResponseMinRate = cmp.Or(l.ResponseMinRate, 4096)
	l.ResponseGrace = cmp.Or(l.ResponseGrace, 5*time.Second)
	return l
}

// HTTPSServer returns the server for the relay's HTTPS listener (agents
// and public HTTPS) with the public limits; tlsConf holds its
// certificates. errLog receives net/http's own errors.
func (s *Server) HTTPSServer(tlsConf *tls.Config, errLog *log.Logger) *http.Server {
	srv := s.publicServer(s.Handler(), errLog)
	srv.TLSConfig = tlsConf
	return srv
}

// HTTPServer returns the server for the relay's plain-HTTP listener
// (public HTTP only) with the public limits.
func (s *Server) HTTPServer(errLog *log.Logger) *http.Server {
	return s.publicServer(s.PublicHTTPHandler(), errLog)
}

func (s *Server) publicServer(h http.Handler, errLog *log.Logger) *http.Server {
	l := s.cfg.Public
	return &http.Server{
		Handler: h, ErrorLog: errLog,
		ReadHeaderTimeout: l.HeaderTimeout, IdleTimeout: l.IdleTimeout, MaxHeaderBytes: l.MaxHeaderBytes,
		HTTP2: &http.HTTP2Config{MaxConcurrentStreams: l.H2MaxStreams},
	}
}

// minRateBody cuts off a request body that arrives slower than rate bytes
// per second on average after grace: before each read, the connection's
// read deadline is set to when the next byte is due at that rate.
type minRateBody struct {
	io.ReadCloser
	rc    *http.ResponseController
	due   time.Time // when the body must be complete at the minimum rate, minus its bytes
	rate  int64
	n     int64
	unset bool
}

// limitBody wraps r's body in a minRateBody, unless there is none.
func (s *Server) limitBody(w http.ResponseWriter, r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return
	}
	l := s.cfg.Public
	r.Body = &minRateBody{ReadCloser: r.Body, rc: http.NewResponseController(w), due: time.Now().Add(l.BodyGrace), rate: int64(l.BodyMinRate)}
}

func (b *minRateBody) Read(p []byte) (int, error) {
	if !b.unset {
		next := b.due.Add(time.Duration((b.n + 1) * int64(time.Second) / b.rate))
		if b.rc.SetReadDeadline(next) != nil {
			b.unset = true // the connection has no deadlines: nothing to do
		}
	}
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	if err == io.EOF && !b.unset {
		// Complete: the connection may serve more requests. After any
		// other error the deadline stays past, so that the server's own
		// reads of the rest fail too and it closes the connection.
		b.rc.SetReadDeadline(time.Time{})
		b.unset = true
	}
	return n, err
}

// minRate is the deadline of each write to a public client: it must be
// taken within grace plus its length at rate. A connection that sits idle
// (an SSH session) has no write pending, so nothing to miss. The deadline
// is moved only when less than half the grace is left (a fast client's
// writes do not each pay for it).
type minRate struct {
	grace time.Duration
	rate  int64
	until time.Time // the deadline set last
}

func (s *Server) newMinRate() minRate {
	l := s.cfg.Public
	return minRate{grace: l.ResponseGrace, rate: int64(l.ResponseMinRate)}
}

// deadline is when a write of len bytes starting now must be done.
func (m minRate) deadline(len int) time.Time {
	return time.Now().Add(m.grace + time.Duration(int64(len)*int64(time.Second)/m.rate))
}

// next returns the deadline to set before a write of len bytes, or false
// when the one set last leaves enough time.
func (m *minRate) next(len int) (time.Time, bool) {
	if time.Until(m.until) > m.grace/2+time.Duration(int64(len)*int64(time.Second)/m.rate) {
		return m.until, false
	}
	m.until = m.deadline(len)
	return m.until, true
}

// minRateResponse cuts off a public client that takes the response
// slower than ResponseMinRate, through its ResponseWriter (write
// deadlines) or, for an upgraded connection, its hijacked connection.
type minRateResponse struct {
	http.ResponseWriter
	rc  *http.ResponseController
	mr  minRate
	cut func() // counts a client cut off (tether_relay_http_errors_total{reason="slow_client"})
}

// limitResponse wraps w for servePublic; done leaves the server's own
// last writes (the end of the response) one grace period.
func (s *Server) limitResponse(w http.ResponseWriter) (_ http.ResponseWriter, done func()) {
	mw := &minRateResponse{ResponseWriter: w, rc: http.NewResponseController(w), mr: s.newMinRate(), cut: s.slowClient}
	return mw, func() { mw.rc.SetWriteDeadline(mw.mr.deadline(4096)) }
}

func (w *minRateResponse) Write(p []byte) (int, error) {
	if d, ok := w.mr.next(len(p)); ok {
		w.rc.SetWriteDeadline(d) // no deadlines (a test recorder): nothing to do
	}
	n, err := w.ResponseWriter.Write(p)
	if isTimeout(err) {
		w.cut()
	}
	return n, err
}

// Flush and Unwrap keep streaming and http.ResponseController working.
func (w *minRateResponse) Flush()                      { w.rc.Flush() }
func (w *minRateResponse) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack hands ReverseProxy the upgraded connection with the same rule on
// its writes (WebSocket data from the device).
func (w *minRateResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := w.rc.Hijack()
	if err != nil {
		return c, brw, err
	}
	c.SetWriteDeadline(time.Time{})
	mr := w.mr
	mr.until = time.Time{} // cleared above
	mc := &minRateConn{Conn: c, mr: mr, cut: w.cut}
	brw.Writer.Reset(mc)
	return mc, brw, nil
}

// minRateConn is a public connection whose writes follow minRate.
type minRateConn struct {
	net.Conn
	mr  minRate
	cut func()
}

func (c *minRateConn) Write(p []byte) (int, error) {
	if d, ok := c.mr.next(len(p)); ok {
		c.Conn.SetWriteDeadline(d)
	}
	n, err := c.Conn.Write(p)
	if isTimeout(err) {
		c.cut()
	}
	return n, err
}

// CloseWrite passes a half-close on (splice.Splice relies on it).
func (c *minRateConn) CloseWrite() error { return closeWrite(c.Conn) }

// closeWrite closes c's write half, or all of c if it has no such half
// (the peer then sees its end of stream all the same).
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// slowClient counts a public client cut off for reading too slowly.
func (s *Server) slowClient() { s.metrics.httpErrors.WithLabelValues("slow_client").Inc() }

// idleConn closes a connection with no byte either way for limit.
type idleConn struct {
	net.Conn
	limit  time.Duration
	onIdle func()       // called when the connection is closed for idleness; may be nil
	last   atomic.Int64 // unix nanoseconds of the last byte
	timer  *time.Timer
}

// closeIdle wraps c so that it is closed after limit without a byte
// either way, calling onIdle (if not nil) when it is; limit <= 0 returns c.
func closeIdle(c net.Conn, limit time.Duration, onIdle func()) net.Conn {
	if limit <= 0 {
		return c
	}
	ic := &idleConn{Conn: c, limit: limit, onIdle: onIdle}
	ic.last.Store(time.Now().UnixNano())
	ic.timer = time.AfterFunc(limit, ic.check)
	return ic
}

func (c *idleConn) check() {
	idle := time.Duration(time.Now().UnixNano() - c.last.Load())
	if idle >= c.limit {
		if c.onIdle != nil {
			c.onIdle()
		}
		c.Conn.Close()
		return
	}
	c.timer.Reset(c.limit - idle)
}

func (c *idleConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.last.Store(time.Now().UnixNano())
	}
	return n, err
}

func (c *idleConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.last.Store(time.Now().UnixNano())
	}
	return n, err
}

// CloseWrite passes a half-close on; the timer goes on until Close.
func (c *idleConn) CloseWrite() error { return closeWrite(c.Conn) }

func (c *idleConn) Close() error {
	c.timer.Stop()
	return c.Conn.Close()
}

// clientCaps counts the connections each client address holds to each
// device (MaxStreamsPerClient).
type clientCaps struct {
	max int
	mu  sync.Mutex
	n   map[deviceClient]int
}

// deviceClient is a client (an IPv4 address, an IPv6 /64: clientKey, as
// the rate limits count them) of a device.
type deviceClient struct {
	device string
	client netip.Prefix
}

func newClientCaps(max int) *clientCaps { return &clientCaps{max: max, n: map[deviceClient]int{}} }

// take counts a connection of the client at remote ("ip:port") to device
// and returns its release, or false when the client is at the cap.
func (c *clientCaps) take(device, remote string) (release func(), ok bool) {
	k := deviceClient{device, clientKey(remote)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[k] >= c.max {
		return nil, false
	}
	c.n[k]++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.n[k]--; c.n[k] <= 0 {
				delete(c.n, k)
			}
		})
	}, true
}

// clientSlot takes one of the client's connections to a device for an
// HTTP request, or answers 429 and returns false.
func (s *Server) clientSlot(w http.ResponseWriter, r *http.Request, deviceID, deviceName string) (release func(), ok bool) {
	release, ok = s.clients.take(deviceID, r.RemoteAddr)
	if !ok {
		s.metrics.streamsRefused.WithLabelValues("client_cap").Inc()
		w.Header().Set("Retry-After", "1")
		s.errorPage(w, http.StatusTooManyRequests, "too_many_from_client", "Too many connections from your address",
			"Your address holds too many open connections to device "+deviceName+"; close some and try again.")
	}
	return release, ok
}
