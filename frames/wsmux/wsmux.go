// Package wsmux carries an smux session over a WebSocket: the agent dials
// with Dial, the relay accepts with package wsserver, and both use the same
// smux configuration.
//
// The frames protocol version travels as the WebSocket subprotocol; a peer
// that does not speak it is refused before smux starts. Compression is off
// (the tunnelled bytes are usually compressed or encrypted already) and smux
// keepalives are off: the heartbeat on the control stream is the one
// liveness mechanism of a session.
//
// The client side is a small RFC 6455 implementation on crypto/tls rather
// than coder/websocket, whose Dial needs net/http: that keeps the agent
// within its size budget. This package must not import net/http.
package wsmux

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

const subprotocol = frames.Subprotocol

// Config tunes the smux session. The zero value is usable.
type Config struct {
	// StreamWindow is each stream's receive window in bytes; one slow
	// reader can hold at most this much. Zero means 512 KiB.
	StreamWindow int
	// SessionWindow bounds the bytes buffered for all streams of a session.
	// Zero means 4 MiB.
	SessionWindow int
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

// Verify checks the configuration once, at startup.
func (c Config) Verify() error {
	if err := smux.VerifyConfig(c.Smux()); err != nil {
		return fmt.Errorf("smux config: %w", err)
	}
	return nil
}

// DialOptions configures Dial and Post.
type DialOptions struct {
	// TLS configures the TLS client; nil means the system roots. ServerName
	// defaults to the URL's host.
	TLS *tls.Config
	// Header is added to the upgrade request.
	Header map[string][]string
	// DialContext opens the TCP connection; nil means a net.Dialer without
	// TCP keepalives (the heartbeat is the liveness check). Tests and the
	// fleet simulator use it to pick source addresses and count bytes.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Mux tunes the smux session.
	Mux Config
}

// ErrProtocol means the peer does not speak this version of the protocol.
var ErrProtocol = errors.New("wsmux: peer does not speak " + frames.Subprotocol)

// Dial opens a WebSocket to url (wss://host/_tether/connect) and starts an
// smux client session over it. ctx bounds the dial only, not the session.
// HTTPS_PROXY from the environment is honoured (CONNECT), as devices behind
// corporate proxies need. A refused upgrade is a *HandshakeError.
func Dial(ctx context.Context, url string, o DialOptions) (*smux.Session, error) {
	c, err := dialWebSocket(ctx, url, o)
	if err != nil {
		return nil, fmt.Errorf("websocket dial %s: %w", url, err)
	}
	s, err := smux.Client(c, o.Mux.Smux())
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("start smux client: %w", err)
	}
	return s, nil
}
