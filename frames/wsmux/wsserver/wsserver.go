// Package wsserver accepts agent sessions on the relay: it upgrades an HTTP
// request to a WebSocket (coder/websocket) and starts an smux server session
// over it, refusing agents that do not speak the protocol's version.
package wsserver

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/xtaci/smux"
)

// Accept upgrades r to a WebSocket and starts an smux server session over
// it. The session lives while r's context does, so the handler must not
// return before it is done with the session. A client that does not offer
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
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols:       []string{frames.Subprotocol},
		CompressionMode:    websocket.CompressionDisabled,
		InsecureSkipVerify: true, // agents are not browsers; they authenticate with their key
	})
	if err != nil {
		return nil, fmt.Errorf("websocket accept: %w", err)
	}
	nc := wsmux.NetConn(r.Context(), c, true)
	s, err := smux.Server(nc, mux.ServerSmux()) // small window until the relay calls mux.Trust
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
