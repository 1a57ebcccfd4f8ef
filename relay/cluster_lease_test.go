package relay_test

import (
	"crypto/ed25519"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// grant is one lease as a relay answered it to an agent.
type grant struct {
	owner string // device ID/service
	lease frames.Lease
}

// TestLeaseUniquenessUnderNATSBounce: devices on three relays register
// growing sets of services concurrently while each NATS server in turn is
// bounced (they go on until the last is back);
// every lease any relay answers is recorded, and the history holds no name
// (hostname or port) granted to two services, and no service whose name
// changed — over more than 10 000 grants.
func TestLeaseUniquenessUnderNATSBounce(t *testing.T) {
	const devices, rounds = 90, 15 // at least (2+…+16) leases each: 135 × 90 = 12 150 grants
	c := relaytest.StartCluster(t, 3, relaytest.Options{TCPPorts: 128})
	c.AwaitMembers()
	keys := make([]ed25519.PrivateKey, devices)
	for i := range keys {
		_, keys[i], _ = ed25519.GenerateKey(nil)
		c.Enroll(t, keys[i], fmt.Sprintf("dev%02d", i))
	}

	var mu sync.Mutex
	var history []grant
	record := func(id string, ls *frames.Leases) {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range ls.Leases {
			history = append(history, grant{owner: id + "/" + l.Service, lease: l})
		}
	}
	start, bounced := make(chan struct{}), make(chan struct{})
	errs := make(chan error, devices)
	var wg sync.WaitGroup
	for i, key := range keys {
		ra := relaytest.DialRaw(t, c.Relays[i%len(c.Relays)].URL(), c.CA.Pool())
		record(frames.DeviceID(key.Public().(ed25519.PublicKey)), ra.Handshake(t, key, services(1)...))
		wg.Go(func() { errs <- registerRounds(ra, key, rounds, start, bounced, record) })
	}
	close(start)
	for _, node := range []int{1, 2, 0} {
		c.BounceNATSNode(node)
	}
	close(bounced)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}

	hosts, ports, names := map[string]string{}, map[uint16]string{}, map[string]frames.Lease{}
	var conflicts int
	for _, g := range history {
		l := g.lease
		if l.Hostname != "" {
			if o, ok := hosts[l.Hostname]; ok && o != g.owner {
				conflicts++
				t.Errorf("hostname %s granted to %s and %s", l.Hostname, o, g.owner)
			}
			hosts[l.Hostname] = g.owner
		}
		if l.Port != 0 {
			if o, ok := ports[l.Port]; ok && o != g.owner {
				conflicts++
				t.Errorf("port %d granted to %s and %s", l.Port, o, g.owner)
			}
			ports[l.Port] = g.owner
		}
		if old, ok := names[g.owner]; ok && old != l {
			t.Errorf("%s moved from %+v to %+v", g.owner, old, l)
		}
		names[g.owner] = l
	}
	t.Logf("%d grants, %d hostnames, %d ports, %d conflicts", len(history), len(hosts), len(ports), conflicts)
	if len(history) < 10000 {
		t.Errorf("only %d grants recorded", len(history))
	}
}

// services returns n+1 services: one TCP, then web1 … webN over HTTP.
func services(n int) []frames.Service {
	svcs := []frames.Service{{Name: "ssh", Proto: "tcp"}}
	for i := range n {
		svcs = append(svcs, frames.Service{Name: fmt.Sprintf("web%d", i+1), Proto: "http"})
	}
	return svcs
}

// registerRounds registers growing sets of services on ra's session,
// from 2 to rounds HTTP services, one set every 100ms once start is
// closed, and the whole set once more after done is closed, recording
// every leases frame the relay sends. It heartbeats while it waits.
func registerRounds(ra *relaytest.RawAgent, key ed25519.PrivateKey, rounds int, start, done <-chan struct{}, record func(string, *frames.Leases)) error {
	id := frames.DeviceID(key.Public().(ed25519.PublicKey))
	heartbeat := time.NewTicker(relaytest.RawHeartbeat / 2)
	defer heartbeat.Stop()
	wait := func(ch <-chan struct{}) error {
		for {
			select {
			case <-ch:
				return nil
			case <-heartbeat.C:
				if err := frames.Write(ra.Ctrl, &frames.Heartbeat{}); err != nil {
					return fmt.Errorf("device %s: heartbeat: %w", id, err)
				}
			}
		}
	}
	register := func(svcs []frames.Service) error {
		if err := frames.Write(ra.Ctrl, &frames.Register{Services: svcs}); err != nil {
			return fmt.Errorf("device %s: register %d services: %w", id, len(svcs), err)
		}
		for {
			ra.Ctrl.SetReadDeadline(time.Now().Add(30 * time.Second))
			m, err := frames.Read(ra.Ctrl, 0)
			if err != nil {
				return fmt.Errorf("device %s: register %d services: %w", id, len(svcs), err)
			}
			if ls, ok := m.(*frames.Leases); ok { // heartbeat acks, and leases sent after a sync, come too
				record(id, ls)
				return nil
			}
		}
	}
	if err := wait(start); err != nil {
		return err
	}
	pace := time.NewTicker(100 * time.Millisecond)
	defer pace.Stop()
	for r := 2; r <= rounds; r++ {
		<-pace.C
		if err := register(services(r)); err != nil {
			return err
		}
	}
	if err := wait(done); err != nil {
		return err
	}
	return register(services(rounds))
}
