// Package wsmux carries an smux session over a WebSocket: the agent dials
// with Dial, the relay accepts with package wsserver, and both use the same
// smux configuration and the same WebSocket-as-net.Conn adapter.
//
// Both sides speak WebSocket through github.com/coder/websocket. The frames
// protocol version travels as the WebSocket subprotocol; a peer that does
// not speak it is refused before smux starts. Compression is off (the
// tunnelled bytes are usually compressed or encrypted already) and smux
// keepalives are off: the heartbeat on the control stream is the one
// liveness mechanism of a session.
package wsmux

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// Config tunes the smux session. The zero value is usable.
type Config struct {
	// StreamWindow is each stream's receive window in bytes; one slow
	// reader can hold at most this much. Zero means 512 KiB.
	StreamWindow int
	// SessionWindow bounds the bytes buffered for all streams of a session.
	// Zero means 4 MiB.
	SessionWindow int
	// PreAuthWindow bounds the bytes a server session buffers before Trust
	// is called on it (its peer authenticated): an unauthenticated client
	// can make the relay hold no more than this and one frame of at most
	// this, on the one stream it may open (smux patch 8: more streams or a
	// longer frame end the session). Zero means 4 KiB; it must exceed
	// frames.MaxPreAuthPayload and a frame header.
	PreAuthWindow int
}

// Smux returns the smux configuration both peers use.
func (c Config) Smux() *smux.Config {
	sc := smux.DefaultConfig()
	sc.Version = 2
	sc.KeepAliveDisabled = true
	sc.MaxFrameSize = 32 << 10
	sc.MaxStreamBuffer = cmp.Or(max(c.StreamWindow, 0), 512<<10)
	sc.MaxReceiveBuffer = cmp.Or(max(c.SessionWindow, 0), 4<<20)
	return sc
}

// ServerSmux is Smux for the accepting side: the session starts with the
// PreAuthWindow until Trust.
func (c Config) ServerSmux() *smux.Config {
	sc := c.Smux()
	sc.InitialReceiveBuffer = min(c.preAuthWindow(), sc.MaxReceiveBuffer)
	return sc
}

// Trust gives a server session started with ServerSmux its whole
// SessionWindow, once its peer authenticated.
func (c Config) Trust(s *smux.Session) {
	sc := c.Smux()
	s.GrowReceiveBuffer(sc.MaxReceiveBuffer - min(c.preAuthWindow(), sc.MaxReceiveBuffer))
}

func (c Config) preAuthWindow() int { return cmp.Or(max(c.PreAuthWindow, 0), 4<<10) }

// Verify checks the configuration once, at startup.
func (c Config) Verify() error {
	if err := smux.VerifyConfig(c.Smux()); err != nil {
		return fmt.Errorf("smux config: %w", err)
	}
	if w := c.preAuthWindow(); w < frames.HeaderLen+frames.MaxPreAuthPayload {
		return fmt.Errorf("smux config: pre-auth window %d bytes is below the %d an agent's hello takes", w, frames.HeaderLen+frames.MaxPreAuthPayload)
	}
	return nil
}

// DialOptions configures Dial and HTTPClient.
type DialOptions struct {
	// TLS configures the TLS client; nil means the system roots.
	TLS *tls.Config
	// Proxy picks the HTTP proxy of a request, as http.Transport.Proxy
	// does; nil means no proxy. tether-agent passes
	// http.ProxyFromEnvironment (HTTPS_PROXY, NO_PROXY; loopback is never
	// proxied). A wss:// relay is reached through the proxy with CONNECT.
	Proxy func(*http.Request) (*url.URL, error)
	// DialContext opens TCP connections (to the relay or the proxy); nil
	// means a net.Dialer without TCP keepalives (the heartbeat is the
	// liveness check). Tests and the fleet simulator use it to pick source
	// addresses and count bytes.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Header is added to the upgrade request.
	Header http.Header
	// Mux tunes the smux session.
	Mux Config
}

// HTTPClient returns an HTTP/1.1 client with o's TLS, proxy and dialer,
// for the agent's other requests to a relay (enrollment). It keeps no idle
// connections: an agent makes one request now and then.
func (o DialOptions) HTTPClient() *http.Client {
	dial := o.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: -1}).DialContext
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.TLS != nil {
		tc = o.TLS.Clone()
	}
	return &http.Client{
		// A relay's redirect is never followed: the agent sends its
		// enrollment token and its session to the relay it was given only.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Transport: coalescingTransport{&http.Transport{
			Proxy:                  o.Proxy,
			DialContext:            dial,
			TLSClientConfig:        tc,
			TLSHandshakeTimeout:    20 * time.Second,
			DisableKeepAlives:      true, // also after a refused upgrade: no idle pool to leak
			ForceAttemptHTTP2:      false,
			MaxResponseHeaderBytes: 64 << 10,
		}}}
}

// ErrProtocol means the peer does not speak this version of the protocol.
var ErrProtocol = errors.New("wsmux: peer does not speak " + frames.Subprotocol)

// HandshakeError is a refused WebSocket upgrade.
type HandshakeError struct {
	Status int    // HTTP status of the answer
	Body   string // the start of the answer's body
}

func (e *HandshakeError) Error() string {
	return fmt.Sprintf("websocket upgrade refused: HTTP %d: %s", e.Status, strings.TrimSpace(e.Body))
}

// Dial opens a WebSocket to url (wss://host/_tether/connect) and starts an
// smux client session over it. ctx bounds the dial only, not the session.
// A refused upgrade is a *HandshakeError; a relay that does not choose the
// protocol's subprotocol is ErrProtocol.
func Dial(ctx context.Context, url string, o DialOptions) (*smux.Session, error) {
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:      o.HTTPClient(),
		HTTPHeader:      o.Header,
		Subprotocols:    []string{frames.Subprotocol},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			var body []byte
			if resp.Body != nil { // coder/websocket keeps the start of the body
				body, _ = io.ReadAll(io.LimitReader(resp.Body, 512))
			}
			return nil, fmt.Errorf("websocket dial %s: %w", url, &HandshakeError{Status: resp.StatusCode, Body: string(body)})
		}
		return nil, fmt.Errorf("websocket dial %s: %w", url, err)
	}
	if p := ws.Subprotocol(); p != frames.Subprotocol {
		ws.CloseNow()
		return nil, fmt.Errorf("websocket dial %s: relay chose subprotocol %q: %w", url, p, ErrProtocol)
	}
	// The session outlives ctx (coder/websocket's NetConn is bound to the
	// context it is given). The agent does not wait for a close handshake
	// with a relay it has declared dead.
	s, err := smux.Client(NetConn(context.Background(), ws, nil), o.Mux.Smux())
	if err != nil {
		ws.CloseNow()
		return nil, fmt.Errorf("start smux client: %w", err)
	}
	return s, nil
}

// NetConn wraps ws as the net.Conn smux runs on: binary messages, one per
// smux write, the conn alive until ctx ends or it is closed. With raw, the
// connection under ws, Close makes a WebSocket close handshake (the relay,
// which may just have written an error frame the agent should read), for
// at most CloseWait: the peer cannot hold it longer, not even by declaring
// a huge message (coder/websocket skips the rest of the message being
// read, byte by byte, with no deadline of its own). Without raw, Close
// closes at once (the agent).
func NetConn(ctx context.Context, ws *websocket.Conn, raw net.Conn) net.Conn {
	return &vecConn{Conn: websocket.NetConn(ctx, ws, websocket.MessageBinary), ws: ws, raw: raw}
}

// CloseWait bounds a graceful Close of a NetConn: writing the close frame
// and waiting for the peer's.
const CloseWait = 5 * time.Second

// vecConn lets smux write each frame (header, payload) with one Write from
// a pooled buffer: without WriteBuffers, smux keeps a 64 KB buffer per
// session, which every idle agent would cost the relay.
type vecConn struct {
	net.Conn
	ws  *websocket.Conn
	raw net.Conn // nil: close at once
}

var framePool = sync.Pool{New: func() any { return new([]byte) }}

func (c *vecConn) WriteBuffers(v [][]byte) (int, error) {
	bp := framePool.Get().(*[]byte)
	defer framePool.Put(bp)
	b := (*bp)[:0]
	for _, p := range v {
		b = append(b, p...)
	}
	*bp = b
	return c.Conn.Write(b)
}

func (c *vecConn) Close() error {
	if c.raw == nil {
		return c.ws.CloseNow()
	}
	c.raw.SetDeadline(time.Now().Add(CloseWait)) // coder/websocket sets none on it
	return c.Conn.Close()
}
