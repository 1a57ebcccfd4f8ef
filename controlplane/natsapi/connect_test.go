package natsapi_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// logLines passes each log line on.
type logLines chan string

func (l logLines) Write(p []byte) (int, error) {
	select {
	case l <- string(p):
	default: // nobody is reading any more
	}
	return len(p), nil
}

// TestConnectAsRole: the options connect with the role's credentials and
// inbox prefix; refused credentials are logged while the client retries.
func TestConnectAsRole(t *testing.T) {
	ns, err := natsembed.StartConfig(natsembed.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	nc, err := natsapi.Connect(ns.ClientURL(), ns.Auth(natsperm.Relay), natsperm.Relay, "relay r1", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if inbox := nc.NewRespInbox(); !strings.HasPrefix(inbox, "_INBOX_relay.") {
		t.Fatalf("relay inbox %s", inbox)
	}

	logs := make(logLines, 64)
	bad := ns.Auth(natsperm.ControlPlane)
	bad.Password = "wrong"
	nc2, err := natsapi.Connect(ns.ClientURL(), bad, natsperm.ControlPlane, "controlplane", slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	timeout := time.After(10 * time.Second)
	for seen := false; !seen; {
		select {
		case line := <-logs:
			seen = strings.Contains(line, "NATS connection attempt failed")
		case <-timeout:
			t.Fatal("refused credentials not logged within 10s")
		}
	}
	if nc2.IsConnected() {
		t.Fatal("connected with a wrong password")
	}
	if _, err := natsapi.Connect(ns.ClientURL(), natsapi.Auth{User: "relay"}, natsperm.Relay, "r", nil); err == nil || !strings.Contains(err.Error(), "empty password") {
		t.Fatalf("a user without a password connected: %v", err)
	}
	if _, err := natsapi.Connect(ns.ClientURL(), natsapi.Auth{User: "relay", CredsFile: "x.creds"}, natsperm.Relay, "r", nil); err == nil {
		t.Fatal("user and creds file together were accepted")
	}
}
