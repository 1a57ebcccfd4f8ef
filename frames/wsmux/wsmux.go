// Package wsmux carries an smux session over a WebSocket: the agent dials,
// the relay accepts, and both use the same smux configuration.
//
// The frames protocol version travels as the WebSocket subprotocol; a peer
// that does not speak it is refused before smux starts. Compression is off
// (the tunnelled bytes are usually compressed or encrypted already) and smux
// keepalives are off: the heartbeat on the control stream is the one
// liveness mechanism of a session.
package wsmux

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
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
}

// Smux returns the smux configuration both peers use.
func (c Config) Smux() *smux.Config {
	sc := smux.DefaultConfig()
	sc.Version = 2
	sc.KeepAliveDisabled = true
	sc.MaxFrameSize = 32 << 10
	sc.MaxStreamBuffer = cmpOr(c.StreamWindow, 512<<10)
	sc.MaxReceiveBuffer = cmpOr(c.SessionWindow, 4<<20)
	return sc
}

// Verify checks the configuration once, at startup.
func (c Config) Verify() error {
	if err := smux.VerifyConfig(c.Smux()); err != nil {
		return fmt.Errorf("smux config: %w", err)
	}
	return nil
}

func cmpOr(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

// DialOptions configures Dial.
type DialOptions struct {
	// TLS configures the TLS client; nil means the system roots.
	TLS *tls.Config
	// Header is added to the upgrade request.
	Header http.Header
	// Mux tunes the smux session.
	Mux Config
}

// ErrProtocol means the peer does not speak this version of the protocol.
var ErrProtocol = errors.New("wsmux: peer does not speak " + frames.Subprotocol)

// Dial opens a WebSocket to url (wss://host/_tether/connect) and starts an
// smux client session over it. ctx bounds the dial only, not the session.
// HTTPS_PROXY from the environment is honoured, as devices behind corporate
// proxies need.
func Dial(ctx context.Context, url string, o DialOptions) (*smux.Session, *http.Response, error) {
	tr := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		TLSClientConfig:     o.TLS,
		TLSHandshakeTimeout: 10 * time.Second,
		ForceAttemptHTTP2:   false,
	}
	defer tr.CloseIdleConnections()
	c, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:      &http.Client{Transport: tr},
		HTTPHeader:      o.Header,
		Subprotocols:    []string{frames.Subprotocol},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, resp, fmt.Errorf("websocket dial %s: %w", url, err)
	}
	if c.Subprotocol() != frames.Subprotocol {
		c.Close(websocket.StatusProtocolError, "unsupported protocol")
		return nil, resp, fmt.Errorf("dial %s: relay chose subprotocol %q: %w", url, c.Subprotocol(), ErrProtocol)
	}
	// The session outlives ctx: NetConn's context bounds the conn's life.
	nc := websocket.NetConn(context.Background(), c, websocket.MessageBinary)
	s, err := smux.Client(nc, o.Mux.Smux())
	if err != nil {
		nc.Close()
		return nil, resp, fmt.Errorf("start smux client: %w", err)
	}
	return s, resp, nil
}

// Accept upgrades r to a WebSocket and starts an smux server session over
// it. The session lives while r's context does, so the handler must not
// return before it is done with the session. A client that does not offer
// the protocol's subprotocol gets 426 and no upgrade.
func Accept(w http.ResponseWriter, r *http.Request, mux Config) (*smux.Session, error) {
	if !offers(r, frames.Subprotocol) {
		w.Header().Set("Sec-WebSocket-Protocol", frames.Subprotocol)
		http.Error(w, "tether: this relay speaks "+frames.Subprotocol+"; upgrade the agent", http.StatusUpgradeRequired)
		return nil, ErrProtocol
	}
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols:       []string{frames.Subprotocol},
		CompressionMode:    websocket.CompressionDisabled,
		InsecureSkipVerify: true, // agents are not browsers; they authenticate with their key
	})
	if err != nil {
		return nil, fmt.Errorf("websocket accept: %w", err)
	}
	nc := websocket.NetConn(r.Context(), c, websocket.MessageBinary)
	s, err := smux.Server(nc, mux.Smux())
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("start smux server: %w", err)
	}
	return s, nil
}

func offers(r *http.Request, proto string) bool {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		if slices.ContainsFunc(strings.Split(h, ","), func(p string) bool { return strings.TrimSpace(p) == proto }) {
			return true
		}
	}
	return false
}
