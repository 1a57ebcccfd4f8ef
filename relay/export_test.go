package relay

import (
	"context"
	"testing"
	"time"

	"github.com/xtaci/smux"
)

// RunSession serves one agent session over mux, as serveAgent does after
// the WebSocket upgrade, so that tests can drive a session over net.Pipe
// in a synctest bubble.
func (s *Server) RunSession(ctx context.Context, mux *smux.Session, remote string) {
	s.runSession(ctx, mux, remote, func() {})
}

// SetTCPIdleFloor lowers, until the test ends, the shortest idle timeout
// a TCP service gets (10s), so that a test sees one act within seconds.
func SetTCPIdleFloor(t testing.TB, d time.Duration) {
	old := tcpIdleFloor.Swap(int64(d))
	t.Cleanup(func() { tcpIdleFloor.Store(old) })
}
