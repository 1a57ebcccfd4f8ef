package agent_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestRelayClampsHeartbeat: an agent configured for a 10-minute heartbeat
// (a dead one would keep its routes for half an hour) heartbeats at the
// relay's ceiling, which the welcome tells it.
func TestRelayClampsHeartbeat(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{RelayConfig: func(c *relay.Config) {
		c.HeartbeatMin, c.HeartbeatMax = 100*time.Millisecond, 300*time.Millisecond
	}})
	cfg := agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", webService(t)))
	cfg.HeartbeatInterval = 10 * time.Minute
	ra := startAgent(t, cfg)
	ra.registered(t)
	before := e.Counter("tether_relay_heartbeats_total", "")
	relaytest.Eventually(t, 10*time.Second, func() error {
		if n := e.Counter("tether_relay_heartbeats_total", "") - before; n < 3 {
			return fmt.Errorf("%v heartbeats so far", n)
		}
		return nil
	})
}
