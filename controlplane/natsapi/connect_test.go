package natsapi_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsembed"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// syncBuffer is a log destination safe for the client's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
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

	var logs syncBuffer
	bad := ns.Auth(natsperm.ControlPlane)
	bad.Password = "wrong"
	nc2, err := natsapi.Connect(ns.ClientURL(), bad, natsperm.ControlPlane, "controlplane", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "NATS connection attempt failed") {
		if time.Now().After(deadline) {
			t.Fatalf("refused credentials not logged:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond) // polling the log
	}
	if nc2.IsConnected() {
		t.Fatal("connected with a wrong password")
	}
	if _, err := natsapi.Connect(ns.ClientURL(), natsapi.Auth{User: "relay", CredsFile: "x.creds"}, natsperm.Relay, "r", nil); err == nil {
		t.Fatal("user and creds file together were accepted")
	}
}
