package cross_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestQEMUSmoke runs the armv6 and arm64 agents under qemu-user against a
// relay on loopback: each enrolls and serves one HTTP request through the
// tunnel. make test installs qemu-user-static; CI must have it.
func TestQEMUSmoke(t *testing.T) {
	emulators := map[string]string{"armv6": "qemu-arm-static", "arm64": "qemu-aarch64-static"}
	for arch, emu := range emulators {
		t.Run(arch, func(t *testing.T) {
			bin := cross.AgentBinary(t, arch)
			qemu, err := exec.LookPath(emu)
			if err != nil {
				if os.Getenv("CI") != "" {
					t.Fatalf("%s is missing on CI (make test installs qemu-user-static)", emu)
				}
				t.Skipf("%s not installed (make test installs qemu-user-static)", emu)
			}
			e := relaytest.Start(t, relaytest.Options{})
			web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fmt.Fprintf(w, "served by the %s agent", arch)
			}))
			t.Cleanup(web.Close) // after the agent stops
			caFile := filepath.Join(t.TempDir(), "ca.pem")
			if err := os.WriteFile(caFile, e.CA.CertPEM, 0o644); err != nil {
				t.Fatal(err)
			}
			agent := harness.StartT(t, harness.Cmd{Path: qemu, Args: []string{bin.Path}, Env: []string{
				"TETHER_RELAY_URL=" + e.RelayURL(), "TETHER_RELAY_CA=" + caFile,
				"TETHER_ENROLL_TOKEN=" + e.Token(1), "TETHER_DEVICE_NAME=pi-" + arch, "TETHER_STATE_DIR=" + t.TempDir(),
				"TETHER_SERVICES=web=" + web.URL, "TETHER_LOG_FORMAT=text"}})
			host := "web-pi-" + arch + ".localhost"
			err = harness.Poll(t.Context(), 60*time.Second, func() error {
				code, body := e.Get(true, host, "/")
				if code != 200 || body != "served by the "+arch+" agent" {
					return fmt.Errorf("GET https://%s/: %d %q", host, code, body)
				}
				return nil
			}, agent)
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}
