package natsembed

import (
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

func TestInProcessRoles(t *testing.T) {
	s, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	if s.ClientURL() != "" {
		t.Fatalf("in-process server listens on %s", s.ClientURL())
	}
	cp, err := s.ConnectAs(natsperm.ControlPlane, "controlplane")
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Close()
	// The old call shape picks the role from the name.
	rl, err := s.Connect("relay r1")
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	sub, err := cp.Subscribe(controlplane.SubjectLookup, func(m *nats.Msg) { m.Respond([]byte("ok")) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	cp.Flush()
	msg, err := rl.Request(controlplane.SubjectLookup, nil, 5*time.Second)
	if err != nil || string(msg.Data) != "ok" {
		t.Fatalf("relay → control plane request: %v", err)
	}
	// The relay's own connection is a relay: it may not listen to requests.
	bad, err := rl.SubscribeSync(controlplane.SubjectEnroll)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.NextMsg(5 * time.Second); !errors.Is(err, nats.ErrPermissionViolation) {
		t.Fatalf("relay subscribed to %s: %v, want a permissions violation", controlplane.SubjectEnroll, err)
	}
}

func TestClusterOnLoopback(t *testing.T) {
	c, err := StartCluster(3, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Shutdown)
	if len(c.Nodes) != 3 {
		t.Fatalf("%d nodes", len(c.Nodes))
	}
	// Anonymous clients are refused.
	if nc, err := nats.Connect(c.Nodes[0].ClientURL()); err == nil {
		nc.Close()
		t.Fatal("anonymous client connected")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("anonymous client: %v, want an authorization error", err)
	}
	// A message crosses from the last node to the first.
	a := c.Auth(natsperm.Relay)
	sub, err := nats.Connect(c.Nodes[0].ClientURL(), nats.UserInfo(a.User, a.Password))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	cpAuth := c.Auth(natsperm.ControlPlane)
	pub, err := nats.Connect(c.Nodes[2].ClientURL(), nats.UserInfo(cpAuth.User, cpAuth.Password))
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	s, err := sub.SubscribeSync(controlplane.SubjectEvents)
	if err != nil {
		t.Fatal(err)
	}
	sub.Flush()
	deadline := time.Now().Add(10 * time.Second)
	for !c.Nodes[2].NATSServer().GlobalAccount().SubscriptionInterest(controlplane.SubjectEvents) {
		if time.Now().After(deadline) {
			t.Fatal("interest never reached node 3")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := pub.Publish(controlplane.SubjectEvents, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if m, err := s.NextMsg(5 * time.Second); err != nil || string(m.Data) != "hi" {
		t.Fatalf("message across the cluster: %v", err)
	}
}
