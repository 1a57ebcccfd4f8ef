package relay

import "net/http"

// ReadyHandler serves /readyz: 503 "not ready: NATS unreachable" while
// natsConnected reports false (the relay cannot learn of revocations or
// presence, and is no cluster member); 200 "degraded: control plane
// unreachable" while its hellos fail (it serves from its replica: known
// devices, no enrollment); 200 "ready" otherwise. A nil natsConnected
// means always connected (embedded NATS).
func (s *Server) ReadyHandler(natsConnected func() bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		switch {
		case natsConnected != nil && !natsConnected():
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("not ready: NATS unreachable\n"))
		case s.isDraining():
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("not ready: draining\n"))
		case !s.ControlPlaneReachable():
			w.Write([]byte("degraded: control plane unreachable\n"))
		default:
			w.Write([]byte("ready\n"))
		}
	})
}
