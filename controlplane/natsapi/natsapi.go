// Package natsapi serves the control plane to relays over NATS and is the
// client relays use to reach it. relay/cluster.md describes the protocol.
//
// Requests are request/reply on controlplane.SubjectPrefix + op (a nats.go
// micro service, queue group "q"). Every reply is a JSON envelope:
// {"result": …} or {"error": {"kind", "message"}}, so that error kinds
// survive the trip. The service publishes numbered device events on
// controlplane.SubjectEvents (one publisher: epoch and seq), keeps the
// table of live relays from their hellos, verifies every connect's
// signature again and accepts its nonce once, and asks live relays to
// confirm revocations. Claim makes sure one control plane serves.
package natsapi

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

var semver = regexp.MustCompile(`^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$`)

type envelope struct {
	Result json.RawMessage     `json:"result,omitempty"`
	Error  *controlplane.Error `json:"error,omitempty"`
}

// Store is the state the service serves: boltstore.Store implements it.
type Store interface {
	controlplane.Relays
	// Record returns the device's record with all its leases.
	Record(ctx context.Context, id string) (controlplane.DeviceRecord, error)
	// Snapshot returns a page of records in ID order after the ID after,
	// read in one transaction; next is "" on the last page.
	Snapshot(ctx context.Context, after string, limit int) (page []controlplane.DeviceRecord, next string, err error)
	// Sync records the sessions a relay holds and ends its others.
	Sync(ctx context.Context, relayID string, sessions []controlplane.SyncSession) (accepted, ended []controlplane.SyncSession, err error)
	// Device finds a device by name or ID.
	Device(ctx context.Context, nameOrID string) (controlplane.Device, error)
	// Revoke revokes a device by name or ID.
	Revoke(ctx context.Context, nameOrID string) (controlplane.Device, error)
	// ReleaseLease frees a lease (hostname label or port) into quarantine.
	ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error)
	// DeleteDevice deletes a revoked device, its leases into quarantine
	// unless keepNames.
	DeleteDevice(ctx context.Context, nameOrID string, keepNames bool) (controlplane.Device, []controlplane.Lease, error)
	// CreateReplaceToken makes a token with which a new device takes over
	// a revoked one's name and leases.
	CreateReplaceToken(ctx context.Context, nameOrID string, ttl time.Duration) (string, controlplane.Token, error)
	// Reserve keeps a relay's own hostname labels from ever being leased
	// and returns those already leased.
	Reserve(ctx context.Context, relayID string, labels []string) ([]controlplane.Lease, error)
}

// Certifier certifies relays' keys: clusterca.CA implements it.
type Certifier interface {
	Issue(req controlplane.CertRequest) (controlplane.CertResponse, error)
}

// ServiceConfig configures Serve.
type ServiceConfig struct {
	// Store answers the requests. Required.
	Store Store
	// CA certifies relays' keys. Nil means cert requests are refused.
	CA Certifier
	// Releases serves releases and rollouts to relays. Nil: no release is
	// ever offered (releases.go).
	Releases ReleaseService
	// Version is reported by the micro service's discovery. Empty means "0.0.0".
	Version string
	// HelloInterval is how often relays say hello; one silent for three
	// intervals is down. Zero means controlplane.HelloInterval.
	HelloInterval time.Duration
	// RevokeTimeout bounds the wait for each relay's confirmation of a
	// revocation. Zero means 3s.
	RevokeTimeout time.Duration
	// NonceTTL is how long a connect's nonce is remembered. Zero means 10 minutes.
	NonceTTL time.Duration
	// MaxNonces bounds the remembered nonces. Zero means 1<<20.
	MaxNonces int
	// Logger receives failures; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Service is the running NATS service.
type Service struct {
	nc       *nats.Conn
	cfg      ServiceConfig
	log      *slog.Logger
	svc      micro.Service
	events   *events
	members  *members
	nonces   *nonces
	handler  *handler
	stop     chan struct{}
	stopOnce sync.Once
	sweeper  sync.WaitGroup
}

// Stop stops serving and waits for the requests being handled.
func (s *Service) Stop() error {
	var err error
	s.stopOnce.Do(func() {
		err = s.svc.Stop()
		s.handler.close()
		close(s.stop)
		s.sweeper.Wait()
	})
	return err
}

// maxConcurrent bounds the requests handled at once; concurrent store
// writes share a transaction (boltstore uses bbolt's Batch).
const maxConcurrent = 256

// maxSyncSessions bounds a sync request.
const maxSyncSessions = 1 << 20

// Serve registers the control plane's endpoints on nc and serves until
// ctx ends or the returned service is stopped. Requests are handled
// concurrently, up to maxConcurrent at once.
func Serve(ctx context.Context, nc *nats.Conn, cfg ServiceConfig) (*Service, error) {
	if cfg.Store == nil {
		return nil, errors.New("natsapi: Store is required")
	}
	cfg.HelloInterval = cmp.Or(cfg.HelloInterval, controlplane.HelloInterval)
	cfg.RevokeTimeout = cmp.Or(cfg.RevokeTimeout, 3*time.Second)
	cfg.NonceTTL = cmp.Or(cfg.NonceTTL, 10*time.Minute)
	cfg.MaxNonces = cmp.Or(cfg.MaxNonces, 1<<20)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
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
		Description: "Tether control plane: enrollment, sessions, leases, membership, certificates",
	})
	if err != nil {
		return nil, fmt.Errorf("add micro service: %w", err)
	}
	s := &Service{
		nc: nc, cfg: cfg, log: log, svc: svc, stop: make(chan struct{}),
		events:  newEvents(nc),
		members: newMembers(cfg.HelloInterval),
		nonces:  newNonces(cfg.NonceTTL, cfg.MaxNonces),
	}
	st := cfg.Store
	h := &handler{log: log, sem: make(chan struct{}, maxConcurrent)}
	s.handler = h
	endpoints := map[string]micro.Handler{
		controlplane.SubjectEnroll:   handle(h, s.enroll),
		controlplane.SubjectConnect:  handle(h, s.connect),
		controlplane.SubjectRegister: handle(h, s.register),
		controlplane.SubjectDisconnect: handle(h, func(ctx context.Context, r controlplane.DisconnectRequest) (struct{}, error) {
			return struct{}{}, s.disconnect(ctx, r)
		}),
		controlplane.SubjectLookup: handle(h, st.Lookup),
		controlplane.SubjectResetRelay: handle(h, func(ctx context.Context, id string) (struct{}, error) {
			if err := s.resetRelay(ctx, id); err != nil {
				return struct{}{}, err
			}
			s.members.reset(id) // it holds no sessions: not lost
			return struct{}{}, nil
		}),
		controlplane.SubjectSnapshot: handle(h, s.snapshot),
		controlplane.SubjectHello:    handle(h, s.hello),
		controlplane.SubjectSync:     handle(h, s.sync),
		controlplane.SubjectCert:     handle(h, s.cert),
	}
	maps.Copy(endpoints, s.releaseEndpoints(h))
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
		s.Stop()
		return nil, fmt.Errorf("register endpoints with the NATS server: %w", err)
	}
	s.sweeper.Go(s.sweep)
	context.AfterFunc(ctx, func() { s.Stop() })
	return s, nil
}

// Epoch is this service's event epoch.
func (s *Service) Epoch() string { return s.events.epoch }

// Relays lists the live relays, by ID.
func (s *Service) Relays() []controlplane.RelayInfo { return s.members.live() }

// PortBusy reports whether a live relay reports port as held by another
// process of its host: the store leases no such port.
func (s *Service) PortBusy(port uint16) bool { return s.members.portBusy(port) }

func (s *Service) enroll(ctx context.Context, r controlplane.EnrollRequest) (controlplane.EnrollResponse, error) {
	if len(r.PublicKey) != 32 {
		return controlplane.EnrollResponse{}, controlplane.Errorf(controlplane.KindInvalid, "public key must be 32 bytes (ed25519), got %d", len(r.PublicKey))
	}
	defer s.events.lockDevice(frames.DeviceID(r.PublicKey))()
	resp, err := s.cfg.Store.Enroll(ctx, r)
	if err != nil {
		return resp, err
	}
	if d, err := s.cfg.Store.Device(ctx, resp.DeviceID); err == nil && d.Replaced != "" {
		// A replacement took the old device's name and leases: relays
		// forget the old one before they learn the new one.
		s.publish(controlplane.DeviceEvent{Kind: controlplane.EventDeleted, DeviceID: d.Replaced})
	}
	s.publishRecord(ctx, resp.DeviceID, func(rec controlplane.DeviceRecord) controlplane.DeviceEvent {
		return controlplane.DeviceEvent{Kind: controlplane.EventEnrolled, DeviceID: rec.ID, Device: &rec}
	})
	return resp, nil
}

// connect checks the agent's signature of the relay's challenge and
// accepts its nonce once, then opens the session: holding relay
// credentials is not enough to open a session for a device.
func (s *Service) connect(ctx context.Context, r controlplane.ConnectRequest) (controlplane.ConnectResponse, error) {
	if len(r.PublicKey) != 32 {
		return controlplane.ConnectResponse{}, controlplane.Errorf(controlplane.KindInvalid, "public key must be 32 bytes (ed25519), got %d", len(r.PublicKey))
	}
	id := frames.DeviceID(r.PublicKey)
	if !frames.VerifyAuth([32]byte(r.PublicKey), r.Nonce, r.RelayID, r.Signature) {
		s.log.Warn("connect refused: bad signature", "device_id", id, "relay", r.RelayID)
		return controlplane.ConnectResponse{}, controlplane.Errorf(controlplane.KindUnauthorized, "device key %s did not sign this handshake with relay %s", id, r.RelayID)
	}
	if !s.nonces.add(r.Nonce, s.cfg.Now()) {
		s.log.Warn("connect refused: replayed handshake", "device_id", id, "relay", r.RelayID)
		return controlplane.ConnectResponse{}, controlplane.Errorf(controlplane.KindUnauthorized, "handshake of device key %s was already used: replayed", id)
	}
	defer s.events.lockDevice(id)()
	resp, err := s.cfg.Store.Connect(ctx, r)
	if err != nil {
		return resp, err
	}
	// Relays holding an older session of the device close it.
	s.publish(controlplane.DeviceEvent{Kind: controlplane.EventSession, DeviceID: resp.DeviceID, Generation: resp.Generation, RelayID: r.RelayID})
	return resp, nil
}

func (s *Service) register(ctx context.Context, r controlplane.RegisterRequest) ([]controlplane.Lease, error) {
	defer s.events.lockDevice(r.DeviceID)()
	leases, err := s.cfg.Store.Register(ctx, r)
	if err != nil {
		return leases, err
	}
	s.publishRecord(ctx, r.DeviceID, func(rec controlplane.DeviceRecord) controlplane.DeviceEvent {
		return controlplane.DeviceEvent{Kind: controlplane.EventLeases, DeviceID: rec.ID, Generation: r.Generation, Leases: rec.Leases}
	})
	return leases, nil
}

func (s *Service) disconnect(ctx context.Context, r controlplane.DisconnectRequest) error {
	defer s.events.lockDevice(r.DeviceID)()
	if err := s.cfg.Store.Disconnect(ctx, r); err != nil {
		return err
	}
	s.publish(controlplane.DeviceEvent{Kind: controlplane.EventOffline, DeviceID: r.DeviceID, Generation: r.Generation})
	return nil
}

// resetRelay ends every session of a relay that restarted (or stops).
func (s *Service) resetRelay(ctx context.Context, id string) error {
	defer s.events.lockAll()()
	if err := s.cfg.Store.ResetRelay(ctx, id); err != nil {
		return err
	}
	s.publish(controlplane.DeviceEvent{Kind: controlplane.EventRelayDown, RelayID: id})
	return nil
}

// snapshot reads a page of the state, numbered by the last event published
// before the page was read.
func (s *Service) snapshot(ctx context.Context, r controlplane.SnapshotRequest) (controlplane.SnapshotResponse, error) {
	epoch, seq := s.events.last()
	page, next, err := s.cfg.Store.Snapshot(ctx, r.After, r.Limit)
	if err != nil {
		return controlplane.SnapshotResponse{}, err
	}
	if page == nil {
		page = []controlplane.DeviceRecord{}
	}
	return controlplane.SnapshotResponse{Epoch: epoch, Seq: seq, Devices: page, Next: next}, nil
}

func (s *Service) hello(ctx context.Context, r controlplane.HelloRequest) (controlplane.HelloResponse, error) {
	if err := controlplane.ValidRelayID(r.RelayID); err != nil {
		return controlplane.HelloResponse{}, err
	}
	if len(r.PublicNames) > 64 || len(r.ReservedLabels) > 64 || len(r.UnboundPorts) > 65536 || len(r.BusyPorts) > 65536 {
		return controlplane.HelloResponse{}, controlplane.Errorf(controlplane.KindInvalid, "hello of relay %s: too many names or ports", r.RelayID)
	}
	for _, label := range r.ReservedLabels {
		if err := frames.ValidLabel(label); err != nil {
			return controlplane.HelloResponse{}, controlplane.Errorf(controlplane.KindInvalid, "hello of relay %s: %v", r.RelayID, err)
		}
	}
	leased, err := s.cfg.Store.Reserve(ctx, r.RelayID, r.ReservedLabels)
	if err != nil {
		return controlplane.HelloResponse{}, err
	}
	for _, l := range leased {
		s.log.Warn("a relay's own name is leased to a device: that relay refuses to start until the lease is released",
			"relay", r.RelayID, "hostname", l.Hostname, "device", l.DeviceName, "service", l.Service)
	}
	slices.Sort(r.BusyPorts) // portBusy searches them
	relays, err := s.members.hello(r, s.cfg.Now().UTC())
	if err != nil {
		return controlplane.HelloResponse{}, err
	}
	epoch, seq := s.events.last()
	return controlplane.HelloResponse{Epoch: epoch, Seq: seq, Relays: relays}, nil
}

func (s *Service) sync(ctx context.Context, r controlplane.SyncRequest) (controlplane.SyncResponse, error) {
	if err := controlplane.ValidRelayID(r.RelayID); err != nil {
		return controlplane.SyncResponse{}, err
	}
	if len(r.Sessions) > maxSyncSessions {
		return controlplane.SyncResponse{}, controlplane.Errorf(controlplane.KindInvalid, "sync of relay %s: %d sessions, at most %d", r.RelayID, len(r.Sessions), maxSyncSessions)
	}
	defer s.events.lockAll()()
	accepted, ended, err := s.cfg.Store.Sync(ctx, r.RelayID, r.Sessions)
	if err != nil {
		return controlplane.SyncResponse{}, err
	}
	for _, e := range ended {
		s.publish(controlplane.DeviceEvent{Kind: controlplane.EventOffline, DeviceID: e.DeviceID, Generation: e.Generation})
	}
	for _, a := range accepted {
		s.publish(controlplane.DeviceEvent{Kind: controlplane.EventSession, DeviceID: a.DeviceID, Generation: a.Generation, RelayID: r.RelayID})
	}
	if accepted == nil {
		accepted = []controlplane.SyncSession{}
	}
	s.log.Info("relay synced its sessions", "relay", r.RelayID, "reported", len(r.Sessions), "accepted", len(accepted), "ended", len(ended))
	return controlplane.SyncResponse{Sessions: accepted}, nil
}

func (s *Service) cert(ctx context.Context, r controlplane.CertRequest) (controlplane.CertResponse, error) {
	if s.cfg.CA == nil {
		return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindUnavailable, "this control plane issues no certificates")
	}
	resp, err := s.cfg.CA.Issue(r)
	if err == nil {
		s.log.Info("certified relay key", "relay", r.RelayID, "kind", r.Kind, "hosts", r.Hosts)
	}
	return resp, err
}

// publish publishes an event; a failure is logged (relays see the gap in
// seq and take a new snapshot).
func (s *Service) publish(ev controlplane.DeviceEvent) {
	if err := s.events.publish(ev); err != nil {
		s.log.Error("device event lost", "kind", ev.Kind, "device_id", ev.DeviceID, "err", err)
	}
}

// publishRecord publishes the event made of the device's record, read
// after its change. If it cannot be read, the change stands and its event
// is lost: its seq is skipped, so relays see the gap and take a snapshot.
func (s *Service) publishRecord(ctx context.Context, id string, event func(controlplane.DeviceRecord) controlplane.DeviceEvent) {
	rec, err := s.cfg.Store.Record(ctx, id)
	if err != nil {
		s.log.Error("device event lost: read the device's record", "device_id", id, "err", err)
		s.events.skip()
		return
	}
	s.publish(event(rec))
}

// sweep declares relays down that fell silent, until Stop.
func (s *Service) sweep() {
	t := time.NewTicker(s.cfg.HelloInterval / 2)
	defer t.Stop()
	reconnects := s.nc.Stats().Reconnects
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		now := s.cfg.Now()
		// While we could not hear hellos, silence proves nothing.
		if r := s.nc.Stats().Reconnects; r != reconnects || !s.nc.IsConnected() {
			reconnects = r
			s.members.cutOff(now)
			continue
		}
		for _, id := range s.members.expire(now) {
			s.log.Warn("relay fell silent: its sessions end", "relay", id, "silent_for", 3*s.cfg.HelloInterval)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := s.resetRelay(ctx, id); err != nil {
				s.log.Error("end the sessions of a silent relay", "relay", id, "err", err)
			}
			cancel()
		}
	}
}

// handler runs each request in its own goroutine, bounded by sem. Once
// closed, it answers that the control plane is unavailable: micro drains
// its subscriptions on Stop, so requests may still arrive.
type handler struct {
	log *slog.Logger
	sem chan struct{}

	mu       sync.RWMutex
	closed   bool
	inflight sync.WaitGroup
}

// close refuses new requests and waits for those being handled.
func (h *handler) close() {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	h.inflight.Wait()
}

func handle[Req, Resp any](h *handler, fn func(context.Context, Req) (Resp, error)) micro.Handler {
	return micro.HandlerFunc(func(r micro.Request) {
		h.mu.RLock()
		if h.closed {
			h.mu.RUnlock()
			r.Respond(reply(h.log, r.Subject(), nil, controlplane.Errorf(controlplane.KindUnavailable, "the control plane is stopping")))
			return
		}
		h.inflight.Add(1)
		h.mu.RUnlock()
		h.sem <- struct{}{} // back-pressure: the subscription waits while all are busy
		go func() {
			defer h.inflight.Done()
			defer func() { <-h.sem }()
			serve(h.log, r, fn)
		}()
	})
}

// serve answers one request with the envelope of fn's result.
func serve[Req, Resp any](log *slog.Logger, r micro.Request, fn func(context.Context, Req) (Resp, error)) {
	var req Req
	var resp Resp
	err := json.Unmarshal(r.Data(), &req)
	if err != nil {
		err = controlplane.Errorf(controlplane.KindInvalid, "decode request on %s: %v", r.Subject(), err)
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err = fn(ctx, req)
		cancel()
	}
	if err := r.Respond(reply(log, r.Subject(), resp, err)); err != nil {
		log.Warn("reply to control plane request", "subject", r.Subject(), "err", err)
	}
}

// reply encodes the envelope of a result or an error. An error that is
// not a controlplane.Error is logged and answered as "internal error",
// so nothing but a message meant for the caller crosses NATS.
func reply(log *slog.Logger, subject string, result any, err error) []byte {
	var env envelope
	if err != nil {
		var ce *controlplane.Error
		if !errors.As(err, &ce) {
			log.Error("request failed", "subject", subject, "err", err)
			ce = controlplane.Errorf(controlplane.KindInternal, "internal error")
		}
		env.Error = ce
	} else {
		env.Result, _ = json.Marshal(result)
	}
	data, _ := json.Marshal(env)
	return data
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}
