package natsapi_test

// Attacks on the cluster by a stranger on NATS and by a client holding
// relay credentials, against three real NATS servers routed on loopback
// with Tether's users and permissions. Each refusal is checked by its
// error (nats.ErrPermissionViolation, nats.ErrAuthorization, the control
// plane's error kind), so that a looser permission fails the test.

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
	"github.com/tetherfleet/tether/frames"
)

// Nodes: the control plane is on node 0; the real relay and the attacker
// share node 1, so that whatever the server would deliver to the attacker
// is delivered before the server answers the attacker's next flush.
const relayNode, attackerNode = 1, 1

type attacker struct {
	nc   *nats.Conn
	errs chan error
}

// newAttacker connects with relay credentials, on a fresh connection per
// attack, so that any permission error is the attack's own.
func newAttacker(t *testing.T, e *controlplanetest.Env) *attacker {
	t.Helper()
	a := &attacker{errs: make(chan error, 16)}
	a.nc = e.Connect(natsperm.Relay, attackerNode, "intruder", nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		a.errs <- err
	}))
	return a
}

// violation waits for the server's permission violation.
func (a *attacker) violation(t *testing.T, what string) {
	t.Helper()
	select {
	case err := <-a.errs:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Fatalf("%s: got %v, want a permissions violation", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no permissions violation within 5s: the server allowed it", what)
	}
}

func clusterEnv(t *testing.T) (*controlplanetest.Env, *natsapi.Client) {
	t.Helper()
	e := controlplanetest.Start(t, controlplanetest.Options{Cluster: true})
	return e, e.Relay(relayNode, "relay-a")
}

func TestStrangersCannotConnect(t *testing.T) {
	e, _ := clusterEnv(t)
	for i, s := range e.NATSCluster.Nodes {
		if nc, err := nats.Connect(s.ClientURL()); !errors.Is(err, nats.ErrAuthorization) {
			if nc != nil {
				nc.Close()
			}
			t.Fatalf("node %d: anonymous client: %v, want an authorization error", i, err)
		}
	}
	url := e.NATSCluster.Nodes[0].ClientURL()
	relayPass := e.NATSCluster.Auth(natsperm.Relay).Password
	for name, opt := range map[string]nats.Option{
		"wrong password":                      nats.UserInfo("relay", "guess"),
		"control plane with relay's password": nats.UserInfo("controlplane", relayPass),
		"unknown user":                        nats.UserInfo("admin", relayPass),
	} {
		if nc, err := nats.Connect(url, opt); !errors.Is(err, nats.ErrAuthorization) {
			if nc != nil {
				nc.Close()
			}
			t.Fatalf("%s: %v, want an authorization error", name, err)
		}
	}
}

// TestRelayCannotReadEnrollments: a relay can neither subscribe to the
// control plane's requests nor see an enrollment (and its token's hash)
// go by.
func TestRelayCannotReadEnrollments(t *testing.T) {
	e, relay := clusterEnv(t)
	for _, subject := range []string{"tether.cp.>", controlplane.SubjectEnroll, ">", "tether.>"} {
		a := newAttacker(t, e)
		sub, err := a.nc.SubscribeSync(subject)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sub.NextMsg(5 * time.Second); !errors.Is(err, nats.ErrPermissionViolation) {
			t.Fatalf("subscribe %s: %v, want a permissions violation", subject, err)
		}
	}
	// While an enrollment happens, the attacker's subscription gets nothing.
	a := newAttacker(t, e)
	got := make(chan *nats.Msg, 16)
	if _, err := a.nc.Subscribe(controlplane.SubjectEnroll, func(m *nats.Msg) { got <- m }); err != nil {
		t.Fatal(err)
	}
	a.violation(t, "subscribe "+controlplane.SubjectEnroll)
	e.Enroll(relay, "pi01")
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		t.Fatalf("the attacker read an enrollment request: %s", m.Data)
	default:
	}
}

// TestRelayCannotOpenSessionsWithoutSignature: relay credentials do not
// open a session for an enrolled device: a missing, wrong or replayed
// signature is refused.
func TestRelayCannotOpenSessionsWithoutSignature(t *testing.T) {
	e, relay := clusterEnv(t)
	ctx := t.Context()
	d := e.Enroll(relay, "pi01")
	intruder := &natsapi.Client{NC: newAttacker(t, e).nc}

	unsigned := controlplane.ConnectRequest{PublicKey: d.Pub, RelayID: "relay-a"}
	_, err := intruder.Connect(ctx, unsigned)
	wantKind(t, err, controlplane.KindUnauthorized)

	other := controlplanetest.NewDevice("other")
	wrongKey := d.Handshake("relay-a")
	copy(wrongKey.Signature[:], ed25519.Sign(other.Priv, frames.AuthMessage(wrongKey.Nonce, [32]byte(d.Pub), "relay-a")))
	_, err = intruder.Connect(ctx, wrongKey)
	wantKind(t, err, controlplane.KindUnauthorized)

	// A real handshake, captured: it opens one session, never a second.
	captured := d.Handshake("relay-a")
	if _, err := relay.Connect(ctx, captured); err != nil {
		t.Fatal(err)
	}
	_, err = intruder.Connect(ctx, captured)
	wantKind(t, err, controlplane.KindUnauthorized)

	if dev, err := e.CP.Store.Device(ctx, d.ID); err != nil || dev.Generation != 1 {
		t.Fatalf("device after the attacks: generation %d (%v), want 1", dev.Generation, err)
	}
}

// TestRelayCannotForgeEvents: a relay can publish neither device events
// (a forged revocation), nor requests to relays, nor a control plane's
// claim; the real relay's Watch sees only the control plane's events.
func TestRelayCannotForgeEvents(t *testing.T) {
	e, relay := clusterEnv(t)
	ctx := t.Context()
	d := e.Enroll(relay, "pi01")
	ev := controlplanetest.Watch(t, relay)

	forged, _ := json.Marshal(controlplane.DeviceEvent{Epoch: e.CP.Service.Epoch(), Seq: 2, Kind: controlplane.EventRevoked, DeviceID: d.ID})
	for _, subject := range []string{controlplane.SubjectEvents, controlplane.RelaySubject("relay-a", controlplane.RelayOpRevoke), controlplane.SubjectClaim} {
		a := newAttacker(t, e)
		if err := a.nc.Publish(subject, forged); err != nil {
			t.Fatal(err)
		}
		if err := a.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		a.violation(t, "publish "+subject)
	}
	// The next event the relay sees is the control plane's.
	if err := relay.ResetRelay(ctx, "relay-b"); err != nil {
		t.Fatal(err)
	}
	if got := ev.Next(t); got.Kind != controlplane.EventRelayDown || got.RelayID != "relay-b" || got.Epoch != e.CP.Service.Epoch() {
		t.Fatalf("the relay saw %+v first", got)
	}
	if dev, _ := e.CP.Store.Device(ctx, d.ID); dev.Revoked {
		t.Fatal("the device is revoked")
	}
}

// TestRelayCannotAnswerAsControlPlane: a relay cannot subscribe to the
// control plane's subjects (plain or in its queue group), its replies or
// its service discovery; a real relay's requests still reach the real
// control plane.
func TestRelayCannotAnswerAsControlPlane(t *testing.T) {
	e, relay := clusterEnv(t)
	ctx := t.Context()
	d := e.Enroll(relay, "pi01")
	answered := make(chan struct{}, 16)
	impostor := func(m *nats.Msg) {
		answered <- struct{}{}
		m.Respond([]byte(`{"result":{"device_id":"` + d.ID + `","name":"evil","generation":99}}`))
	}
	for _, tc := range []struct{ subject, queue string }{
		{controlplane.SubjectConnect, ""},
		{controlplane.SubjectConnect, "q"},
		{"tether.cp.*", "q"},
		{controlplane.InboxControlPlane + ".>", ""},
		{"$SRV.>", ""},
	} {
		a := newAttacker(t, e)
		if _, err := a.nc.QueueSubscribe(tc.subject, tc.queue, impostor); err != nil {
			t.Fatal(err)
		}
		a.violation(t, "subscribe "+tc.subject+" queue "+tc.queue)
	}
	for range 5 {
		cr, err := relay.Connect(ctx, d.Handshake("relay-a"))
		if err != nil || cr.Name != "pi01" {
			t.Fatalf("a real relay's connect: %+v %v", cr, err)
		}
	}
	select {
	case <-answered:
		t.Fatal("the impostor received a request")
	default:
	}
	if dev, _ := e.CP.Store.Device(ctx, d.ID); dev.Generation != 5 {
		t.Fatalf("generation %d after five connects answered by the control plane", dev.Generation)
	}
}
