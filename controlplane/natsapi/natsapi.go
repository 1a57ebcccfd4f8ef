// Package natsapi serves the control plane to relays over NATS request/reply
// (a nats.go micro service) and is the client relays use to reach it.
//
// Every reply is a JSON envelope: {"result": …} or {"error": {"kind", "message"}},
// so that error kinds survive the trip. Device events (revocations, new
// sessions) are published on controlplane.SubjectEvents.
package natsapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/tetherfleet/tether/controlplane"
)

var semver = regexp.MustCompile(`^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$`)

type envelope struct {
	Result json.RawMessage     `json:"result,omitempty"`
	Error  *controlplane.Error `json:"error,omitempty"`
}

// ServiceConfig configures Serve.
type ServiceConfig struct {
	// Store answers the requests. Required.
	Store controlplane.Relays
	// Version is reported by the micro service's discovery. Empty means "0.0.0".
	Version string
	// Logger receives failures; nil discards them.
	Logger *slog.Logger
}

// Service is the running NATS service.
type Service struct {
	svc      micro.Service
	inflight sync.WaitGroup
}

// Stop stops serving and waits for the requests being handled.
func (s *Service) Stop() error {
	err := s.svc.Stop()
	s.inflight.Wait()
	return err
}

// maxConcurrent bounds the requests handled at once; concurrent store
// writes share a transaction (boltstore uses bbolt's Batch).
const maxConcurrent = 256

// Serve registers the control plane's endpoints on nc and serves until
// ctx ends or the returned service is stopped. Requests are handled
// concurrently, up to maxConcurrent at once.
func Serve(ctx context.Context, nc *nats.Conn, cfg ServiceConfig) (*Service, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	version := strings.TrimPrefix(cfg.Version, "v")
	if !semver.MatchString(version) {
		version = "0.0.0" // micro wants SemVer; dev builds have none
	}
	svc, err := micro.AddService(nc, micro.Config{
		Name:        "tether-controlplane",
		Version:     version,
		Description: "Tether control plane: enrollment, sessions, leases",
	})
	if err != nil {
		return nil, fmt.Errorf("add micro service: %w", err)
	}
	st := cfg.Store
	service := &Service{svc: svc}
	h := &handler{log: log, sem: make(chan struct{}, maxConcurrent), inflight: &service.inflight}
	endpoints := map[string]micro.Handler{
		controlplane.SubjectEnroll:   handle(h, st.Enroll),
		controlplane.SubjectRegister: handle(h, st.Register),
		controlplane.SubjectLookup:   handle(h, st.Lookup),
		controlplane.SubjectDisconnect: handle(h, func(ctx context.Context, r controlplane.DisconnectRequest) (struct{}, error) {
			return struct{}{}, st.Disconnect(ctx, r)
		}),
		controlplane.SubjectResetRelay: handle(h, func(ctx context.Context, id string) (struct{}, error) { return struct{}{}, st.ResetRelay(ctx, id) }),
		controlplane.SubjectConnect: handle(h, func(ctx context.Context, r controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
			resp, err := st.Connect(ctx, r)
			if err == nil {
				// Relays holding an older session of the device close it.
				err = Publish(nc, controlplane.DeviceEvent{Kind: controlplane.EventSession, DeviceID: resp.DeviceID, Generation: resp.Generation, RelayID: r.RelayID})
			}
			return resp, err
		}),
	}
	for subject, h := range endpoints {
		name := subject[len(controlplane.SubjectPrefix):]
		if err := svc.AddEndpoint(name, h, micro.WithEndpointSubject(subject)); err != nil {
			svc.Stop()
			return nil, fmt.Errorf("add endpoint %s: %w", name, err)
		}
	}
	// The server must have the subscriptions before a relay, on another
	// connection, sends its first request; otherwise it gets "no responders".
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		service.Stop()
		return nil, fmt.Errorf("register endpoints with the NATS server: %w", err)
	}
	context.AfterFunc(ctx, func() { service.Stop() })
	return service, nil
}

// handler runs each request in its own goroutine, bounded by sem.
type handler struct {
	log      *slog.Logger
	sem      chan struct{}
	inflight *sync.WaitGroup
}

func handle[Req, Resp any](h *handler, fn func(context.Context, Req) (Resp, error)) micro.Handler {
	return micro.HandlerFunc(func(r micro.Request) {
		h.sem <- struct{}{} // back-pressure: the subscription waits while all are busy
		h.inflight.Go(func() {
			defer func() { <-h.sem }()
			serve(h.log, r, fn)
		})
	})
}

// serve answers one request with the envelope of fn's result.
func serve[Req, Resp any](log *slog.Logger, r micro.Request, fn func(context.Context, Req) (Resp, error)) {
	var env envelope
	var req Req
	if err := json.Unmarshal(r.Data(), &req); err != nil {
		env.Error = controlplane.Errorf(controlplane.KindInvalid, "decode request on %s: %v", r.Subject(), err)
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := fn(ctx, req)
		cancel()
		if err != nil {
			var ce *controlplane.Error
			if !errors.As(err, &ce) {
				log.Error("control plane request failed", "subject", r.Subject(), "err", err)
				ce = controlplane.Errorf(controlplane.KindInternal, "internal error")
			}
			env.Error = ce
		} else {
			env.Result, _ = json.Marshal(resp)
		}
	}
	data, _ := json.Marshal(env)
	if err := r.Respond(data); err != nil {
		log.Warn("reply to control plane request", "subject", r.Subject(), "err", err)
	}
}

// Publish sends a device event to every relay.
func Publish(nc *nats.Conn, ev controlplane.DeviceEvent) error {
	data, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if err := nc.Publish(controlplane.SubjectEvents, data); err != nil {
		return fmt.Errorf("publish %s event: %w", ev.Kind, err)
	}
	return nc.Flush()
}

// Client reaches the control plane over NATS. It implements
// controlplane.Relays.
type Client struct {
	NC *nats.Conn
	// Timeout bounds each request. Zero means 5s.
	Timeout time.Duration
}

var _ controlplane.Relays = (*Client)(nil)

func call[Req, Resp any](ctx context.Context, c *Client, subject string, req Req) (Resp, error) {
	var resp Resp
	data, err := json.Marshal(req)
	if err != nil {
		return resp, err
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	msg, err := c.NC.RequestWithContext(ctx, subject, data)
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrConnectionClosed) {
			return resp, controlplane.Errorf(controlplane.KindUnavailable, "control plane unreachable (%s): %v", subject, err)
		}
		return resp, fmt.Errorf("request %s: %w", subject, err)
	}
	var env envelope
	if err := json.Unmarshal(msg.Data, &env); err != nil {
		return resp, fmt.Errorf("decode reply on %s: %w", subject, err)
	}
	if env.Error != nil {
		return resp, env.Error
	}
	if err := json.Unmarshal(env.Result, &resp); err != nil {
		return resp, fmt.Errorf("decode result on %s: %w", subject, err)
	}
	return resp, nil
}

func (c *Client) Enroll(ctx context.Context, req controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	return call[controlplane.EnrollRequest, controlplane.EnrollResponse](ctx, c, controlplane.SubjectEnroll, req)
}

func (c *Client) Connect(ctx context.Context, req controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
	return call[controlplane.ConnectRequest, controlplane.ConnectResponse](ctx, c, controlplane.SubjectConnect, req)
}

func (c *Client) Register(ctx context.Context, req controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	return call[controlplane.RegisterRequest, []controlplane.Lease](ctx, c, controlplane.SubjectRegister, req)
}

func (c *Client) Disconnect(ctx context.Context, req controlplane.DisconnectRequest) error {
	_, err := call[controlplane.DisconnectRequest, struct{}](ctx, c, controlplane.SubjectDisconnect, req)
	return err
}

func (c *Client) Lookup(ctx context.Context, req controlplane.LookupRequest) (controlplane.Lease, error) {
	return call[controlplane.LookupRequest, controlplane.Lease](ctx, c, controlplane.SubjectLookup, req)
}

func (c *Client) ResetRelay(ctx context.Context, relayID string) error {
	_, err := call[string, struct{}](ctx, c, controlplane.SubjectResetRelay, relayID)
	return err
}

// Watch calls fn for every device event until ctx ends.
func (c *Client) Watch(ctx context.Context, fn func(controlplane.DeviceEvent)) error {
	sub, err := c.NC.Subscribe(controlplane.SubjectEvents, func(m *nats.Msg) {
		var ev controlplane.DeviceEvent
		if json.Unmarshal(m.Data, &ev) == nil {
			fn(ev)
		}
	})
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", controlplane.SubjectEvents, err)
	}
	if err := c.NC.Flush(); err != nil {
		sub.Unsubscribe()
		return fmt.Errorf("subscribe %s: %w", controlplane.SubjectEvents, err)
	}
	context.AfterFunc(ctx, func() { sub.Unsubscribe() })
	return nil
}
