package ops_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/controlplane/ops"
)

// TestPprofOnlyWhenAsked: /debug/pprof is not served unless enabled;
// the other endpoints always are.
func TestPprofOnlyWhenAsked(t *testing.T) {
	for _, enabled := range []bool{false, true} {
		srv := httptest.NewServer(ops.Handler(prometheus.NewRegistry(), nil, enabled))
		get := func(path string) (int, string) {
			resp, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode, string(b)
		}
		for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/cmdline", "/debug/pprof/goroutine?debug=1"} {
			code, body := get(path)
			want := map[bool]int{false: http.StatusNotFound, true: http.StatusOK}[enabled]
			if code != want {
				t.Errorf("pprof enabled=%v: GET %s = %d, want %d", enabled, path, code, want)
			}
			if enabled && path == "/debug/pprof/goroutine?debug=1" && !strings.Contains(body, "goroutine") {
				t.Errorf("goroutine profile: %.200q", body)
			}
		}
		for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
			if code, _ := get(path); code != http.StatusOK {
				t.Errorf("pprof enabled=%v: GET %s = %d", enabled, path, code)
			}
		}
		srv.Close()
	}
}
