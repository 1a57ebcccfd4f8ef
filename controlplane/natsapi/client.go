package natsapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane"
)

// Client reaches the control plane over NATS: it is what a relay uses. It
// implements controlplane.Cluster (and so controlplane.Relays) and
// controlplane.Releases (releases.go).
//
// NC should be connected as natsperm.Relay with ConnectOptions (or
// natsembed's ConnectAs): its inbox prefix must be the relay role's.
//
// Errors are *controlplane.Error with the control plane's kind; when the
// control plane cannot be reached (no responder, timeout, connection
// closed) the kind is controlplane.KindUnavailable, on which a relay
// serves from its replica.
type Client struct {
	NC *nats.Conn
	// Timeout bounds each request. Zero means 5s.
	Timeout time.Duration
	// PlanTTL is how long Offer reuses the control plane's rollout plan
	// when no release event said it changed (releases.go). Zero means 30s.
	PlanTTL time.Duration

	rcOnce sync.Once
	rc     *releaseCache // releases.go
}

var _ controlplane.Cluster = (*Client)(nil)

var discard = slog.New(slog.DiscardHandler)

func (c *Client) call(ctx context.Context, subject string, req, resp any) error {
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return roundTrip(ctx, c.NC, subject, req, resp)
}

// request sends req to subject and decodes the envelope of the reply.
func request[Req, Resp any](ctx context.Context, nc *nats.Conn, subject string, req Req) (Resp, error) {
	var resp Resp
	err := roundTrip(ctx, nc, subject, req, &resp)
	return resp, err
}

func roundTrip(ctx context.Context, nc *nats.Conn, subject string, req, resp any) error {
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode request on %s: %w", subject, err)
	}
	msg, err := nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrConnectionClosed) {
			return controlplane.Errorf(controlplane.KindUnavailable, "no answer on %s: %v", subject, err)
		}
		return fmt.Errorf("request %s: %w", subject, err)
	}
	var env envelope
	if err := json.Unmarshal(msg.Data, &env); err != nil {
		return fmt.Errorf("decode reply on %s: %w", subject, err)
	}
	if env.Error != nil {
		return env.Error
	}
	if resp == nil || len(env.Result) == 0 {
		return nil
	}
	if err := json.Unmarshal(env.Result, resp); err != nil {
		return fmt.Errorf("decode result on %s: %w", subject, err)
	}
	return nil
}

// Enroll registers a device's public key with an enrollment token's hash.
func (c *Client) Enroll(ctx context.Context, req controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	var resp controlplane.EnrollResponse
	return resp, c.call(ctx, controlplane.SubjectEnroll, req, &resp)
}

// Connect asks for a new session of the device whose agent signed the
// relay's challenge: req carries the nonce and the signature, which the
// control plane verifies again and accepts once. It answers with the
// session's generation and publishes a session event.
func (c *Client) Connect(ctx context.Context, req controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
	var resp controlplane.ConnectResponse
	return resp, c.call(ctx, controlplane.SubjectConnect, req, &resp)
}

// Register records the session's services and returns their leases; the
// control plane publishes the device's leases.
func (c *Client) Register(ctx context.Context, req controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	var resp []controlplane.Lease
	return resp, c.call(ctx, controlplane.SubjectRegister, req, &resp)
}

// Disconnect ends a session (a newer one is not affected) and publishes
// an offline event.
func (c *Client) Disconnect(ctx context.Context, req controlplane.DisconnectRequest) error {
	return c.call(ctx, controlplane.SubjectDisconnect, req, nil)
}

// Lookup finds the lease of a hostname label or a port.
func (c *Client) Lookup(ctx context.Context, req controlplane.LookupRequest) (controlplane.Lease, error) {
	var resp controlplane.Lease
	return resp, c.call(ctx, controlplane.SubjectLookup, req, &resp)
}

// ResetRelay ends every session of the relay (it starts or stops holding
// none) and publishes relay-down.
func (c *Client) ResetRelay(ctx context.Context, relayID string) error {
	return c.call(ctx, controlplane.SubjectResetRelay, relayID, nil)
}

// Snapshot returns one page of device records in ID order after
// req.After, read in one transaction, with the epoch and the seq of the
// last event published before it was read. Next is "" on the last page.
//
// To build a replica: Watch first (buffering events), then read the pages
// (SnapshotAll). A page covers the IDs after its After up to its last
// record (the last page: all IDs after its After); apply to a device only
// the events numbered after the Seq of the page that covers its ID. After
// that, apply events in order; a new epoch or a gap in seq means: take a
// new snapshot.
func (c *Client) Snapshot(ctx context.Context, req controlplane.SnapshotRequest) (controlplane.SnapshotResponse, error) {
	var resp controlplane.SnapshotResponse
	return resp, c.call(ctx, controlplane.SubjectSnapshot, req, &resp)
}

// ErrEpochChanged is returned by SnapshotAll when the control plane
// restarted between pages: start over.
var ErrEpochChanged = errors.New("the control plane restarted during the snapshot (new epoch): start over")

// SnapshotAll reads every page of the snapshot (limit records each; zero
// means the control plane's default) and calls fn with each, in order.
func (c *Client) SnapshotAll(ctx context.Context, limit int, fn func(controlplane.SnapshotResponse) error) error {
	after, epoch := "", ""
	for {
		page, err := c.Snapshot(ctx, controlplane.SnapshotRequest{After: after, Limit: limit})
		if err != nil {
			return err
		}
		if epoch != "" && page.Epoch != epoch {
			return ErrEpochChanged
		}
		epoch = page.Epoch
		if err := fn(page); err != nil {
			return err
		}
		if page.Next == "" {
			return nil
		}
		after = page.Next
	}
}

// Hello announces the relay (every controlplane.HelloInterval) and
// returns the live relays, the asker included, with the control plane's
// current epoch and seq (a relay whose last applied event is older
// missed some: it takes a new snapshot).
func (c *Client) Hello(ctx context.Context, req controlplane.HelloRequest) (controlplane.HelloResponse, error) {
	var resp controlplane.HelloResponse
	return resp, c.call(ctx, controlplane.SubjectHello, req, &resp)
}

// Sync reports the sessions the relay holds after the control plane was
// unreachable, provisional generations included. The answer lists the
// sessions accepted, with the generation each has now; the relay closes
// every session left out (superseded elsewhere, or revoked). The control
// plane marks everything else it had online on the relay offline.
func (c *Client) Sync(ctx context.Context, req controlplane.SyncRequest) (controlplane.SyncResponse, error) {
	var resp controlplane.SyncResponse
	return resp, c.call(ctx, controlplane.SubjectSync, req, &resp)
}

// Cert asks the cluster CA to certify a key the relay generated: a peer
// certificate (controlplane.CertPeer, no hosts) or a name-constrained
// intermediate (controlplane.CertIntermediate, the hosts it may issue
// for: domains and IP addresses).
func (c *Client) Cert(ctx context.Context, req controlplane.CertRequest) (controlplane.CertResponse, error) {
	var resp controlplane.CertResponse
	return resp, c.call(ctx, controlplane.SubjectCert, req, &resp)
}

// Watch calls fn for every device event until ctx ends: from one
// goroutine, in the order the control plane published them (seq order
// within an epoch). Events published before Watch returns may be missed;
// a relay compares seq with its snapshot's.
func (c *Client) Watch(ctx context.Context, fn func(controlplane.DeviceEvent)) error {
	return c.subscribe(ctx, controlplane.SubjectEvents, func(m *nats.Msg) {
		var ev controlplane.DeviceEvent
		if json.Unmarshal(m.Data, &ev) == nil {
			fn(ev)
		}
	})
}

// subscribe calls cb for each message on subject until ctx ends, once the
// server has the subscription.
func (c *Client) subscribe(ctx context.Context, subject string, cb nats.MsgHandler) error {
	sub, err := c.NC.Subscribe(subject, cb)
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", subject, err)
	}
	if err := c.NC.Flush(); err != nil {
		sub.Unsubscribe()
		return fmt.Errorf("subscribe %s: %w", subject, err)
	}
	context.AfterFunc(ctx, func() { sub.Unsubscribe() })
	return nil
}

// ServeRevocations answers the control plane's revocation notices to
// relay relayID until ctx ends: apply cuts the device off (closes its
// session here and refuses it from now on) and returns once it has; the
// control plane counts the relay as confirmed only then. apply runs on one
// goroutine, one notice at a time.
func (c *Client) ServeRevocations(ctx context.Context, relayID string, apply func(context.Context, controlplane.RevokeNotice) error) error {
	if err := controlplane.ValidRelayID(relayID); err != nil {
		return err
	}
	subject := controlplane.RelaySubject(relayID, controlplane.RelayOpRevoke)
	return c.subscribe(ctx, subject, func(m *nats.Msg) {
		var n controlplane.RevokeNotice
		err := json.Unmarshal(m.Data, &n)
		if err != nil {
			err = controlplane.Errorf(controlplane.KindInvalid, "decode revoke notice: %v", err)
		} else {
			err = apply(ctx, n)
		}
		m.Respond(reply(discard, subject, struct{}{}, err))
	})
}
