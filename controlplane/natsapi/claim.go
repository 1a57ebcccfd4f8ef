package natsapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
)

// DefaultClaimWait is how long a starting control plane listens for
// another one before it serves.
const DefaultClaimWait = 2 * time.Second

// ClaimConfig configures Claim.
type ClaimConfig struct {
	// Wait is how long to listen for other control planes. Zero means
	// DefaultClaimWait.
	Wait time.Duration
	// Host names this control plane in other control planes' errors.
	// Empty means the host name.
	Host string
	// Logger; nil discards.
	Logger *slog.Logger
	// Now is the clock of the claim's Started; nil means time.Now.
	Now func() time.Time
}

// ClaimError is why a control plane may not serve: Other is active, or
// is starting with an earlier claim.
type ClaimError struct {
	Other controlplane.Claim
}

func (e *ClaimError) Error() string {
	o := e.Other
	if o.Active {
		return fmt.Sprintf("another control plane is active on this NATS (host %s, instance %s, since %s): only one may serve; stop it first, or use it",
			o.Host, o.Instance, o.Started.Format(time.RFC3339))
	}
	return fmt.Sprintf("another control plane is starting on this NATS with an earlier claim (host %s, instance %s, started %s): only one may serve",
		o.Host, o.Instance, o.Started.Format(time.RFC3339))
}

// Active is the claim of the control plane that serves: it answers every
// other claim with Active: true until Release.
type Active struct {
	Claim controlplane.Claim
	sub   *nats.Subscription
}

// Release stops answering claims (when the control plane stops serving).
// Releasing again, or after the connection closed, does nothing.
func (a *Active) Release() error {
	if err := a.sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		return fmt.Errorf("release control plane claim: %w", err)
	}
	return nil
}

// earlier orders claims: by start time, then by instance.
func earlier(a, b controlplane.Claim) bool {
	if !a.Started.Equal(b.Started) {
		return a.Started.Before(b.Started)
	}
	return a.Instance < b.Instance
}

// Claim makes sure this is the only control plane on nc's NATS before it
// serves: it waits until nc is connected (or ctx ends), publishes a claim
// on controlplane.SubjectClaim and listens for cfg.Wait. If an active
// control plane answers, or another starting one has an earlier claim, it
// returns a *ClaimError naming it. Otherwise it returns the Active claim,
// which from then on answers every claim with Active: true; while it
// listens it answers claims with its own, so of two starting control
// planes the later one learns of the earlier.
func Claim(ctx context.Context, nc *nats.Conn, cfg ClaimConfig) (*Active, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	wait := cfg.Wait
	if wait <= 0 {
		wait = DefaultClaimWait
	}
	now := time.Now
	if cfg.Now != nil {
		now = cfg.Now
	}
	host := cfg.Host
	if host == "" {
		host = hostname()
	}
	if err := waitConnected(ctx, nc, log); err != nil {
		return nil, err
	}
	b := make([]byte, 8)
	rand.Read(b)
	// mine is never written again: the claim handler reads it.
	mine := controlplane.Claim{Instance: hex.EncodeToString(b), Host: host, Started: now().UTC()}
	var (
		mu     sync.Mutex
		active bool
		rival  *controlplane.Claim // the strongest other claim seen
	)
	note := func(c controlplane.Claim) {
		mu.Lock()
		defer mu.Unlock()
		if c.Instance == mine.Instance {
			return
		}
		if c.Active {
			if rival == nil || !rival.Active {
				rival = &c
			}
			return
		}
		if earlier(c, mine) && (rival == nil || !rival.Active && earlier(c, *rival)) {
			rival = &c
		}
	}
	sub, err := nc.Subscribe(controlplane.SubjectClaim, func(m *nats.Msg) {
		var c controlplane.Claim
		if json.Unmarshal(m.Data, &c) != nil || c.Instance == mine.Instance {
			return
		}
		note(c)
		mu.Lock()
		answer := mine
		answer.Active = active
		mu.Unlock()
		if m.Reply != "" {
			data, _ := json.Marshal(answer)
			m.Respond(data)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("listen for control plane claims: %w", err)
	}
	fail := func(err error) (*Active, error) {
		sub.Unsubscribe()
		return nil, err
	}
	inbox := nc.NewInbox()
	answers, err := nc.Subscribe(inbox, func(m *nats.Msg) {
		var c controlplane.Claim
		if json.Unmarshal(m.Data, &c) == nil {
			note(c)
		}
	})
	if err != nil {
		return fail(fmt.Errorf("listen for answers to the claim: %w", err))
	}
	defer answers.Unsubscribe()
	if err := flush(ctx, nc); err != nil {
		return fail(fmt.Errorf("register claim subscriptions: %w", err))
	}
	data, _ := json.Marshal(mine)
	claim := func() error {
		if err := nc.PublishRequest(controlplane.SubjectClaim, inbox, data); err != nil {
			return fmt.Errorf("publish control plane claim: %w", err)
		}
		if err := flush(ctx, nc); err != nil {
			return fmt.Errorf("publish control plane claim: %w", err)
		}
		return nil
	}
	log.Info("claiming the control plane role", "instance", mine.Instance, "wait", wait)
	// The claim goes out twice: at once, and halfway through the wait.
	// In a NATS cluster, a subscription reaches the other servers a moment
	// after it is made, so two control planes starting together on two
	// servers could miss each other's first claim; by the second, their
	// subscriptions have long spread.
	for _, step := range []func() error{claim, pause(ctx, wait/2), claim, pause(ctx, wait-wait/2)} {
		if err := step(); err != nil {
			return fail(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if rival != nil {
		sub.Unsubscribe()
		return nil, &ClaimError{Other: *rival}
	}
	active = true
	won := mine
	won.Active = true
	return &Active{Claim: won, sub: sub}, nil
}

// waitConnected returns once nc is connected, or with ctx's error: a
// claim made while NATS is unreachable would hear nobody.
func waitConnected(ctx context.Context, nc *nats.Conn, log *slog.Logger) error {
	if nc.IsConnected() {
		return nil
	}
	ch := nc.StatusChanged(nats.CONNECTED, nats.CLOSED)
	defer nc.RemoveStatusListener(ch)
	log.Info("waiting for NATS before claiming the control plane role")
	for !nc.IsConnected() {
		if nc.IsClosed() {
			return fmt.Errorf("claim the control plane role: %w", nats.ErrConnectionClosed)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("claim the control plane role: waiting for NATS: %w", ctx.Err())
		case <-ch:
		}
	}
	return nil
}

// flush waits until the server has processed what nc sent, within 10s.
func flush(ctx context.Context, nc *nats.Conn) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return nc.FlushWithContext(ctx)
}

// pause returns a step that waits for d or until ctx ends.
func pause(ctx context.Context, d time.Duration) func() error {
	return func() error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return fmt.Errorf("claim the control plane role: %w", ctx.Err())
		case <-t.C:
			return nil
		}
	}
}
