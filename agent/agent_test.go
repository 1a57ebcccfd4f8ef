package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/frames/wsmux/wsserver"
	"github.com/xtaci/smux"
)

func TestParseServices(t *testing.T) {
	good, err := ParseServices("web=http://127.0.0.1:8080, ssh=tcp://127.0.0.1:22,")
	if err != nil || len(good) != 2 || good[0] != (Service{Name: "web", Proto: "http", Addr: "127.0.0.1:8080"}) || good[1].Proto != "tcp" {
		t.Fatalf("got %v %v", good, err)
	}
	bad := map[string]string{
		"":                             "no services",
		"web":                          `"web"`,
		"web=ftp://127.0.0.1:21":       "ftp",
		"Web=http://127.0.0.1:80":      `"Web"`,
		"web=http://127.0.0.1":         "HOST:PORT",
		"web=http://127.0.0.1:80/path": "no path",
		"web=http://127.0.0.1:80,web=tcp://[::1]:1": "twice",
		"xn--web=http://127.0.0.1:80":               `"xn--web"`,
		"web=http://127.0.0.1:80?x=1":               "?idle=DURATION",
	}
	for in, says := range bad {
		if _, err := ParseServices(in); err == nil || !strings.Contains(err.Error(), says) {
			t.Errorf("ParseServices(%q) = %v, want an error saying %s", in, err, says)
		}
	}
	// A name of the older grammar, with '-', still parses: the relay keeps
	// the hostname it holds.
	if legacy, err := ParseServices("my-web=http://127.0.0.1:80"); err != nil || legacy[0].Name != "my-web" {
		t.Errorf("legacy name: %v %v", legacy, err)
	}
}

// TestParseServiceIdle: a tcp service may ask for an idle timeout,
// ?idle=DURATION, of whole seconds from 10s to 24h; anything else is
// refused, naming the entry and what is wrong.
func TestParseServiceIdle(t *testing.T) {
	svcs, err := ParseServices("web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22?idle=10m,db=tcp://[::1]:5432?idle=10s,mq=tcp://127.0.0.1:1883?idle=24h")
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []time.Duration{0, 10 * time.Minute, 10 * time.Second, 24 * time.Hour} {
		if svcs[i].IdleTimeout != want {
			t.Errorf("%s: idle %v, want %v", svcs[i].Name, svcs[i].IdleTimeout, want)
		}
	}
	if svcs[2].Addr != "[::1]:5432" {
		t.Errorf("address %q", svcs[2].Addr)
	}
	bad := map[string]string{
		"ssh=tcp://127.0.0.1:22?idle=0":          "outside 10s..24h0m0s",
		"ssh=tcp://127.0.0.1:22?idle=0s":         "outside",
		"ssh=tcp://127.0.0.1:22?idle=-5m":        "outside",
		"ssh=tcp://127.0.0.1:22?idle=9s":         "outside",
		"ssh=tcp://127.0.0.1:22?idle=25h":        "outside",
		"ssh=tcp://127.0.0.1:22?idle=9999999h":   "want a duration",
		"ssh=tcp://127.0.0.1:22?idle=10.5s":      "whole number of seconds",
		"ssh=tcp://127.0.0.1:22?idle=ten":        "want a duration",
		"ssh=tcp://127.0.0.1:22?idle=":           "want a duration",
		"ssh=tcp://127.0.0.1:22?idle=600":        "want a duration",
		"ssh=tcp://127.0.0.1:22?idle":            "want a duration",
		"ssh=tcp://127.0.0.1:22?idle=1m&idle=2m": "the one option",
		"ssh=tcp://127.0.0.1:22?timeout=1m":      "the one option",
		"ssh=tcp://127.0.0.1:22?idle=1m#x":       "no path",
		"web=http://127.0.0.1:80?idle=1m":        "tcp:// services only",
	}
	for in, says := range bad {
		_, err := ParseServices(in)
		if err == nil || !strings.Contains(err.Error(), says) || !strings.Contains(err.Error(), strings.Split(in, "=")[0]) {
			t.Errorf("ParseServices(%q) = %v, want an error naming the service and saying %s", in, err, says)
		}
	}

	// The agent tells the relay, in seconds.
	f := newFakeRelay(t)
	runAgent(t, f, svcs...)
	want := []frames.Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp", IdleSeconds: 600},
		{Name: "db", Proto: "tcp", IdleSeconds: 10}, {Name: "mq", Proto: "tcp", IdleSeconds: 86400}}
	if got := f.next(t, 10*time.Second).reg.Services; !slices.Equal(got, want) {
		t.Errorf("registered %+v, want %+v", got, want)
	}

	// A Config built in code is held to the same bounds.
	for _, svc := range []Service{
		{Name: "ssh", Proto: "tcp", Addr: "127.0.0.1:22", IdleTimeout: time.Second},
		{Name: "ssh", Proto: "tcp", Addr: "127.0.0.1:22", IdleTimeout: -time.Minute},
		{Name: "ssh", Proto: "tcp", Addr: "127.0.0.1:22", IdleTimeout: 15500 * time.Millisecond},
		{Name: "web", Proto: "http", Addr: "127.0.0.1:80", IdleTimeout: time.Minute},
	} {
		c := Config{RelayURLs: []string{"wss://relay.example.com"}, StateDir: t.TempDir(), Services: []Service{svc}}
		if err := c.setDefaults(); err == nil || !strings.Contains(err.Error(), "service "+svc.Name) {
			t.Errorf("Config with %+v: %v, want an error naming the service", svc, err)
		}
	}
}

func TestSlug(t *testing.T) {
	for in, want := range map[string]string{
		"raspberrypi": "raspberrypi", "Pi_Zero 2W": "pi-zero-2w", "host.example.com": "host",
		"--": "device", strings.Repeat("a", 50): strings.Repeat("a", 40),
	} {
		if got := slug(in); got != want {
			t.Errorf("slug(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestBackoffIsCappedFullJitter(t *testing.T) {
	b := &backoff{base: 500 * time.Millisecond, max: 30 * time.Second}
	var sawLarge bool
	for i := range 200 {
		d := b.next()
		ceil := min(30*time.Second, 500*time.Millisecond<<min(i, 30))
		if d <= 0 || d > ceil+time.Millisecond {
			t.Fatalf("wait %d = %v, outside (0, %v]", i, d, ceil)
		}
		sawLarge = sawLarge || d > 10*time.Second
	}
	if !sawLarge {
		t.Fatal("never waited long: the cap is not reached")
	}
	b.reset()
	if d := b.next(); d > 501*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}

// fakeRelay enrolls anyone and completes handshakes, then lets the test
// drive the session.
type fakeRelay struct {
	srv      *httptest.Server
	sessions chan *fakeSession
}

type fakeSession struct {
	mux  *smux.Session
	ctrl *smux.Stream
	reg  *frames.Register // the agent's registration
}

// newFakeRelay starts a fake relay with httptest's certificate, or with
// cert when one is given.
func newFakeRelay(t *testing.T, cert ...*tls.Certificate) *fakeRelay {
	f := &fakeRelay{sessions: make(chan *fakeSession, 8)}
	mux := http.NewServeMux()
	mux.HandleFunc(frames.EnrollPath, func(w http.ResponseWriter, r *http.Request) {
		var req frames.EnrollRequest
		json.NewDecoder(r.Body).Decode(&req)
		json.NewEncoder(w).Encode(frames.EnrollResponse{DeviceID: frames.DeviceID(req.PublicKey), Name: req.Name})
	})
	mux.HandleFunc(frames.ConnectPath, func(w http.ResponseWriter, r *http.Request) {
		m, err := wsserver.Accept(w, r, wsmux.Config{})
		if err != nil {
			return
		}
		defer m.Close()
		ctrl, err := m.AcceptStream()
		if err != nil {
			return
		}
		hello, _ := frames.Read(ctrl, 0)
		frames.Write(ctrl, &frames.Challenge{RelayID: "fake"})
		frames.Read(ctrl, 0) // auth: not checked here
		wsmux.Config{}.Trust(m)
		frames.Write(ctrl, &frames.Welcome{DeviceID: frames.DeviceID(hello.(*frames.Hello).PublicKey[:]), DeviceName: "dev", Generation: 1})
		m1, _ := frames.Read(ctrl, 0)
		reg, _ := m1.(*frames.Register)
		frames.Write(ctrl, &frames.Leases{})
		f.sessions <- &fakeSession{mux: m, ctrl: ctrl, reg: reg}
		<-m.CloseChan()
	})
	f.srv = httptest.NewUnstartedServer(mux)
	if len(cert) > 0 {
		f.srv.TLS = &tls.Config{Certificates: []tls.Certificate{*cert[0]}}
	}
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeRelay) next(t *testing.T, within time.Duration) *fakeSession {
	t.Helper()
	select {
	case s := <-f.sessions:
		t.Cleanup(func() { s.mux.Close() })
		return s
	case <-time.After(within):
		t.Fatalf("no session within %v", within)
	}
	return nil
}

func runAgent(t *testing.T, f *fakeRelay, services ...Service) {
	t.Helper()
	pool := f.srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	a, err := New(Config{
		RelayURLs: []string{"wss://" + f.srv.Listener.Addr().String()}, EnrollToken: "tth_x", StateDir: t.TempDir(),
		DeviceName: "dev", Services: services, RootCAs: pool, HeartbeatInterval: time.Second, BackoffMax: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// TestOnlyRegisteredServicesAreDialled: the relay names services, never
// addresses; unknown names and unreachable services are refused clearly.
func TestOnlyRegisteredServicesAreDialled(t *testing.T) {
	f := newFakeRelay(t)
	up, _ := net.Listen("tcp", "127.0.0.1:0")
	defer up.Close()
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "from web")
			c.Close()
		}
	}()
	down, _ := net.Listen("tcp", "127.0.0.1:0")
	downAddr := down.Addr().String()
	down.Close()
	runAgent(t, f, Service{Name: "web", Proto: "http", Addr: up.Addr().String()}, Service{Name: "db", Proto: "tcp", Addr: downAddr})
	s := f.next(t, 10*time.Second)

	open := func(service string) (frames.Message, *smux.Stream) {
		st, err := s.mux.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		frames.Write(st, &frames.StreamOpen{Service: service, ClientAddr: "203.0.113.1:1"})
		st.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := frames.Read(st, 0)
		if err != nil {
			t.Fatalf("%s: %v", service, err)
		}
		return m, st
	}
	m, st := open("web")
	if _, ok := m.(*frames.StreamAccept); !ok {
		t.Fatalf("web: %#v", m)
	}
	if b, _ := io.ReadAll(st); string(b) != "from web" {
		t.Fatalf("web said %q", b)
	}
	for service, code := range map[string]frames.ErrorCode{"127.0.0.1:22": frames.CodeUnknownService, "db": frames.CodeDialFailed} {
		m, _ := open(service)
		r, ok := m.(*frames.StreamRefuse)
		if !ok || r.Code != code || strings.Contains(r.Message, downAddr) {
			t.Fatalf("%s: %#v", service, m)
		}
	}
}

func TestNotEnrolledWithoutToken(t *testing.T) {
	a, err := New(Config{RelayURLs: []string{"wss://127.0.0.1:1"}, StateDir: t.TempDir(), Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Run(t.Context()); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("got %v", err)
	}
}
