// Package wsserver accepts agent sessions on the relay: it upgrades an HTTP
// request to a WebSocket (coder/websocket) and starts an smux server session
// over it, refusing agents that do not speak the protocol's version.
package wsserver

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/xtaci/smux"
)

// Accept upgrades r to a WebSocket and starts an smux server session over
// it. The session keeps r's context values but not its cancellation: it
// lives until it is closed, and the handler may return and serve it from
// another goroutine. A client that does not offer
// the protocol's subprotocol gets 426 and no upgrade.
//
// The session buffers only mux.PreAuthWindow until mux.Trust is called on
// it, once the peer authenticated. Call it before streams carry bulk data:
// with the small window, a stream's window updates can wait behind data
// nobody reads, and the session stalls.
func Accept(w http.ResponseWriter, r *http.Request, mux wsmux.Config) (*smux.Session, error) {
	if !offers(r, frames.Subprotocol) {
		w.Header().Set("Sec-WebSocket-Protocol", frames.Subprotocol)
		http.Error(w, "tether: this relay speaks "+frames.Subprotocol+"; upgrade the agent", http.StatusUpgradeRequired)
		return nil, wsmux.ErrProtocol
	}
	sb := &smallBuffers{ResponseWriter: w}
	c, err := websocket.Accept(sb, r, &websocket.AcceptOptions{
		Subprotocols:       []string{frames.Subprotocol},
		CompressionMode:    websocket.CompressionDisabled,
		InsecureSkipVerify: true, // agents are not browsers; they authenticate with their key
	})
	if err != nil {
		return nil, fmt.Errorf("websocket accept: %w", err)
	}
	nc := wsmux.NetConn(context.WithoutCancel(r.Context()), c, sb.conn) // a close handshake, bounded
	s, err := smux.Server(nc, mux.ServerSmux())                         // small window until the relay calls mux.Trust
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("start smux server: %w", err)
	}
	return s, nil
}

// ioBuffer is the size of an agent connection's read and write buffers,
// in place of net/http's 4 KiB each, which are a third of what an
// unauthenticated connection costs the relay. coder/websocket reads frame
// headers through the reader and payloads of this size or more straight
// into the caller's buffer; smaller reads copy from crypto/tls's
// decrypted record (no system call). A frame written of more than this
// goes out as two TLS writes instead of one, as frames of more than 4 KiB
// always did.
const ioBuffer = 512

// smallBuffers hands coder/websocket the hijacked connection with
// ioBuffer-sized buffers, and keeps the connection.
type smallBuffers struct {
	http.ResponseWriter
	conn net.Conn
}

func (w *smallBuffers) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *smallBuffers) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if n := brw.Reader.Buffered(); n > 0 { // an eager client's first frames
		b, _ := brw.Reader.Peek(n)
		conn = &eagerConn{Conn: conn, early: bytes.Clone(b)}
	}
	w.conn = conn
	return conn, bufio.NewReadWriter(bufio.NewReaderSize(conn, ioBuffer), bufio.NewWriterSize(conn, ioBuffer)), nil
}

// eagerConn reads the bytes net/http had buffered first. They go in the
// connection, not in the new reader: coder/websocket resets the reader it
// is given to read from the connection.
type eagerConn struct {
	net.Conn
	early []byte
}

func (c *eagerConn) Read(p []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

func offers(r *http.Request, proto string) bool {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		if slices.ContainsFunc(strings.Split(h, ","), func(p string) bool { return strings.TrimSpace(p) == proto }) {
			return true
		}
	}
	return false
}
