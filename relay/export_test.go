package relay

import (
	"context"

	"github.com/xtaci/smux"
)

// RunSession serves one agent session over mux, as serveAgent does after
// the WebSocket upgrade, so that tests can drive a session over net.Pipe
// in a synctest bubble.
func (s *Server) RunSession(ctx context.Context, mux *smux.Session, remote string) {
	s.runSession(ctx, mux, remote, func() {})
}
