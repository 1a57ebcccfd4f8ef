package deploy

import (
	"net"
	"testing"
)

// TestImagesKeepOpsOnLoopback: no image serves its ops endpoints
// (unauthenticated /metrics, and /debug/pprof when enabled) beyond the
// container unless its deployment says so; none turns pprof on.
func TestImagesKeepOpsOnLoopback(t *testing.T) {
	for name, st := range readDockerfile(t) {
		if v, ok := st.env["TETHER_PPROF"]; ok {
			t.Errorf("Dockerfile stage %s sets TETHER_PPROF=%s", name, v)
		}
		addr, ok := st.env["TETHER_OPS_ADDR"]
		if !ok {
			continue // the binary's default: loopback
		}
		host, _, err := net.SplitHostPort(addr)
		if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
			t.Errorf("Dockerfile stage %s: TETHER_OPS_ADDR=%s is not a loopback address", name, addr)
		}
		for _, p := range st.expose {
			if _, port, _ := net.SplitHostPort(addr); p == port {
				t.Errorf("Dockerfile stage %s exposes its ops port %s", name, p)
			}
		}
	}
}
