// Package agent is the Tether device agent: it enrolls the device's key,
// holds one outbound session to a relay (WebSocket + smux), registers the
// device's local services, keeps the session alive with heartbeats, and
// serves the streams the relay opens by dialling only those services.
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/tetherfleet/tether/agent/update"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
)

// Config configures an agent. Zero values of optional fields mean the
// documented defaults.
type Config struct {
	// RelayURLs are the relays to connect to, tried in turn
	// (wss://relay.example.com). Required.
	RelayURLs []string
	// EnrollToken enrolls the device's new key on first start. Empty is
	// fine once the device is enrolled.
	EnrollToken string
	// StateDir keeps the device key (mode 0600) and enrollment record. Required.
	StateDir string
	// DeviceName is the name requested at enrollment. Empty means the
	// hostname, made DNS-safe; on a clash the control plane then adds a suffix.
	DeviceName string
	// Services are the local services to publish. Required.
	Services []Service
	// RootCAs verifies the relay's certificate. Nil means the system roots.
	RootCAs *x509.CertPool
	// HeartbeatInterval is the period of heartbeats; the relay is declared
	// dead after three intervals without an answer. Zero means 15s.
	HeartbeatInterval time.Duration
	// BackoffMax caps the wait between reconnects. Zero means 30s.
	BackoffMax time.Duration
	// MaxStreams caps concurrent streams. Zero means 1024.
	MaxStreams int
	// DialTimeout bounds dialling a local service. Zero means 5s.
	DialTimeout time.Duration
	// Version is reported to the relay, and the version updates start
	// from (a development build, not vMAJOR.MINOR.PATCH, takes none).
	Version string
	// Updater swaps in the releases the relay offers and rolls back a
	// new version that does not become healthy (after healthyAfter
	// heartbeat acknowledgements). Nil means every offer is refused.
	Updater *update.Updater
	// ReleaseKeys verify offered releases. Empty means every offer is
	// refused.
	ReleaseKeys release.Keys
	// UpdateRate caps an update's download, in bytes a second. Zero means
	// 1 MiB/s.
	UpdateRate int
	// Arch is this binary's architecture as release manifests name it.
	// Empty means Arch().
	Arch string
	// Mux tunes the smux session.
	Mux wsmux.Config
	// DialContext opens TCP connections to relays and proxies. Nil means a
	// plain dialer; the fleet simulator uses it to pick source addresses
	// and count bytes at the socket.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Proxy picks the HTTP proxy for a request to a relay (CONNECT for
	// wss://). Nil means none; tether-agent passes
	// http.ProxyFromEnvironment (HTTPS_PROXY, NO_PROXY).
	Proxy func(*http.Request) (*url.URL, error)
	// Insecure allows ws:// relay URLs (no TLS: the enrollment token and
	// the session travel in cleartext). False refuses them.
	Insecure bool
	// Logger; nil discards.
	Logger *slog.Logger
	// OnLeases, if set, is called with the public names of the services
	// whenever the relay assigns them.
	OnLeases func([]frames.Lease)
}

// Service is a local service the agent publishes.
type Service struct {
	Name  string // DNS-safe name, e.g. "web"
	Proto string // "http" or "tcp"
	Addr  string // local host:port, e.g. "127.0.0.1:8080"
	// IdleTimeout asks the relay to close a public connection to a tcp
	// service after this long without a byte either way: whole seconds,
	// MinIdleTimeout..MaxIdleTimeout. Zero means none asked (the relay's
	// own TETHER_TCP_IDLE_TIMEOUT applies, by default never).
	IdleTimeout time.Duration
}

// The bounds of Service.IdleTimeout, as the protocol has them.
const (
	MinIdleTimeout = frames.MinIdleSeconds * time.Second
	MaxIdleTimeout = frames.MaxIdleSeconds * time.Second
)

// ParseServices parses "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22".
// A tcp service may take an idle timeout, "ssh=tcp://127.0.0.1:22?idle=10m"
// (see Service.IdleTimeout). An error names the entry that does not parse.
func ParseServices(s string) ([]Service, error) {
	var out []Service
	seen := map[string]bool{}
	for entry := range strings.SplitSeq(s, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		svc, err := parseService(entry)
		if err != nil {
			return nil, fmt.Errorf("service %q: %w", entry, err)
		}
		if seen[svc.Name] {
			return nil, fmt.Errorf("service %q: name %s is used twice", entry, svc.Name)
		}
		seen[svc.Name] = true
		out = append(out, svc)
	}
	if len(out) == 0 {
		return nil, errors.New("no services: set e.g. web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22")
	}
	if len(out) > frames.MaxServices {
		return nil, fmt.Errorf("%d services; at most %d", len(out), frames.MaxServices)
	}
	return out, nil
}

func parseService(entry string) (Service, error) {
	name, rawURL, ok := strings.Cut(entry, "=")
	if !ok {
		return Service{}, errors.New("want NAME=PROTO://HOST:PORT")
	}
	if err := frames.ValidServiceName(name); err != nil && !frames.LegacyServiceName(name) {
		return Service{}, err
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return Service{}, err
	}
	if u.Scheme != "http" && u.Scheme != "tcp" {
		return Service{}, fmt.Errorf("protocol %q: want http:// or tcp://", u.Scheme)
	}
	if u.Path != "" && u.Path != "/" || u.User != nil || u.Fragment != "" {
		return Service{}, errors.New("want only PROTO://HOST:PORT[?idle=DURATION], no path or user")
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" || port == "" {
		return Service{}, fmt.Errorf("address %q: want HOST:PORT", u.Host)
	}
	svc := Service{Name: name, Proto: u.Scheme, Addr: u.Host}
	if u.RawQuery != "" {
		if svc.IdleTimeout, err = parseIdle(u.Scheme, u.RawQuery); err != nil {
			return Service{}, err
		}
	}
	return svc, nil
}

// parseIdle parses a service's options, "idle=DURATION", the one there is.
func parseIdle(proto, query string) (time.Duration, error) {
	key, val, _ := strings.Cut(query, "=")
	if key != "idle" || strings.ContainsAny(val, "&;=") {
		return 0, fmt.Errorf("option %q: the one option is ?idle=DURATION (tcp:// only)", query)
	}
	if proto != "tcp" {
		return 0, errors.New("?idle= applies to tcp:// services only (the relay bounds HTTP connections itself)")
	}
	d, err := time.ParseDuration(val)
	if err != nil {
		return 0, fmt.Errorf("idle %q: want a duration such as 90s, 10m, 2h", val)
	}
	if err := checkIdle(d); err != nil {
		return 0, fmt.Errorf("idle %q: %w", val, err)
	}
	return d, nil
}

// checkIdle checks a service's idle timeout other than zero.
func checkIdle(d time.Duration) error {
	if d < MinIdleTimeout || d > MaxIdleTimeout {
		return fmt.Errorf("%v is outside %v..%v (leave idle out never to close an idle connection)", d, MinIdleTimeout, MaxIdleTimeout)
	}
	if d%time.Second != 0 {
		return fmt.Errorf("%v is not a whole number of seconds", d)
	}
	return nil
}

// DefaultDeviceName makes the hostname a DNS-safe device name.
func DefaultDeviceName() string {
	h, _ := os.Hostname()
	return slug(h)
}

func slug(s string) string {
	s, _, _ = strings.Cut(strings.ToLower(s), ".")
	var b strings.Builder
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else if b.Len() > 0 && !strings.HasSuffix(b.String(), "-") {
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > frames.MaxDeviceName {
		out = strings.TrimRight(out[:frames.MaxDeviceName], "-")
	}
	if out == "" {
		return "device"
	}
	return out
}

func (c *Config) setDefaults() error {
	if len(c.RelayURLs) == 0 {
		return errors.New("agent: no relay URL (TETHER_RELAY_URL)")
	}
	for i, u := range c.RelayURLs {
		cu, err := connectURL(u, c.Insecure)
		if err != nil {
			return err
		}
		c.RelayURLs[i] = cu
	}
	if c.StateDir == "" {
		return errors.New("agent: no state dir (TETHER_STATE_DIR)")
	}
	if len(c.Services) == 0 {
		return errors.New("agent: no services (TETHER_SERVICES)")
	}
	for _, svc := range c.Services {
		if svc.IdleTimeout == 0 {
			continue
		}
		if svc.Proto != "tcp" {
			return fmt.Errorf("agent: service %s: an idle timeout applies to tcp services only", svc.Name)
		}
		if err := checkIdle(svc.IdleTimeout); err != nil {
			return fmt.Errorf("agent: service %s: idle timeout %w", svc.Name, err)
		}
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = 15 * time.Second
	}
	if c.HeartbeatInterval < time.Second || c.HeartbeatInterval > 10*time.Minute {
		return fmt.Errorf("agent: heartbeat interval %v is outside 1s..10m", c.HeartbeatInterval)
	}
	if c.BackoffMax <= 0 {
		c.BackoffMax = 30 * time.Second
	}
	if c.MaxStreams <= 0 {
		c.MaxStreams = 1024
	}
	if c.UpdateRate <= 0 {
		c.UpdateRate = 1 << 20
	}
	if c.UpdateRate < 1024 {
		return fmt.Errorf("agent: update rate %d bytes/s is below 1024", c.UpdateRate)
	}
	if c.Arch == "" {
		c.Arch = Arch()
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c.Mux.Verify()
}

// connectURL turns wss://host[:port][/] into the relay's session URL.
func connectURL(raw string, insecure bool) (string, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil || (u.Scheme != "wss" && u.Scheme != "ws") || u.Host == "" {
		return "", fmt.Errorf("agent: relay URL %q: want wss://HOST[:PORT]", raw)
	}
	if u.Scheme == "ws" && !insecure {
		return "", fmt.Errorf("agent: relay URL %q is ws:// (no TLS: the enrollment token would travel in cleartext); use wss://, or set TETHER_INSECURE=true on a closed test network", raw)
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = frames.ConnectPath
	}
	return u.String(), nil
}

// enrollURL is the https:// enrollment endpoint of a relay's session URL.
func enrollURL(connect string) string {
	u, _ := url.Parse(connect)
	u.Scheme = map[string]string{"wss": "https", "ws": "http"}[u.Scheme]
	u.Path = frames.EnrollPath
	return u.String()
}
