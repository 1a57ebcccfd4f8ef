package relay

import (
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/tetherfleet/tether/frames"
	"golang.org/x/time/rate"
)

// RateLimit is a token bucket per client address: Burst attempts at once,
// then PerSecond sustained. IPv4 clients are keyed by address, IPv6
// clients by their /64 (one host usually holds a whole /64).
type RateLimit struct {
	// PerSecond is the sustained rate of attempts per client. Zero means
	// the endpoint's default; negative means no limit.
	PerSecond float64
	// Burst is how many attempts a client may make at once. Zero means
	// the endpoint's default.
	Burst int
}

// Default per-client limits. A fleet behind one NAT shares one address:
// the connect burst lets 2 000 agents reconnect at once after a relay
// restart and 100 more each second (agents back off with jitter on a
// 429, as on any refused upgrade), like the generous per-IP buckets of
// hosted tunnel services; enrollment is rarer (a provisioning batch of
// 50, then one a second) and the endpoint a token guesser would use.
var (
	DefaultConnectLimit = RateLimit{PerSecond: 100, Burst: 2000}
	DefaultEnrollLimit  = RateLimit{PerSecond: 1, Burst: 50}
	// DefaultReleaseLimit bounds /install.sh and /_tether/release/ (a
	// binary is megabytes): a site installing 30 devices at once, then
	// one every 10 s. Agents update over their sessions, not these.
	DefaultReleaseLimit = RateLimit{PerSecond: 0.1, Burst: 30}
)

// ParseRate reads a rate setting: "off" or "0" (no limit), "N" or "N/s"
// (per second), "N/m" (per minute) or "N/h" (per hour). It returns
// attempts per second, negative for no limit.
func ParseRate(s string) (float64, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "off" || s == "0" {
		return -1, nil
	}
	num, unit, _ := strings.Cut(s, "/")
	per := map[string]float64{"": 1, "s": 1, "m": 60, "h": 3600}[unit]
	n, err := strconv.ParseFloat(num, 64)
	if per == 0 || err != nil || n < 0 || math.IsInf(n, 0) || math.IsNaN(n) {
		return 0, fmt.Errorf("rate %q: want off, N, N/s, N/m or N/h", s)
	}
	if n == 0 {
		return -1, nil
	}
	return n / per, nil
}

// maxLimitedClients bounds the clients a limiter remembers; beyond it the
// clients whose bucket is full again (as good as forgotten) are dropped
// first, then arbitrary ones.
const maxLimitedClients = 16384

// limiter applies a RateLimit per client address to one endpoint.
type limiter struct {
	endpoint string
	limit    rate.Limit
	burst    int
	refused  prometheus.Counter
	log      *boundedLog
	now      func() time.Time

	mu      sync.Mutex
	clients map[netip.Prefix]*rate.Limiter
}

// newLimiter returns the limiter of an endpoint ("enroll", "connect"), or
// nil when it has no limit.
func newLimiter(endpoint string, l, def RateLimit, refused *prometheus.CounterVec, log *slog.Logger) *limiter {
	if l.PerSecond == 0 {
		l.PerSecond = def.PerSecond
	}
	if l.Burst <= 0 {
		l.Burst = def.Burst
	}
	if l.PerSecond < 0 {
		return nil
	}
	return &limiter{endpoint: endpoint, limit: rate.Limit(l.PerSecond), burst: l.Burst,
		refused: refused.WithLabelValues(endpoint), log: newBoundedLog(log, time.Minute), now: time.Now,
		clients: map[netip.Prefix]*rate.Limiter{}}
}

// clientKey is the bucket of a remote address: the IPv4 address, or the
// IPv6 /64. An unparsable address (not from a TCP listener) shares one.
func clientKey(remote string) netip.Prefix {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return netip.Prefix{}
	}
	a := ap.Addr().Unmap()
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// allow takes one attempt from the client's bucket; when it is empty, it
// returns how long until the next attempt would be allowed.
func (l *limiter) allow(key netip.Prefix) (bool, time.Duration) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.clients[key]
	if !ok {
		if len(l.clients) >= maxLimitedClients {
			l.evict(now)
		}
		b = rate.NewLimiter(l.limit, l.burst)
		l.clients[key] = b
	}
	r := b.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

// evict drops the clients whose bucket is full again, and arbitrary others
// until an eighth of the map is free (so that evictions stay rare).
func (l *limiter) evict(now time.Time) {
	for k, b := range l.clients {
		if b.TokensAt(now) >= float64(l.burst) {
			delete(l.clients, k)
		}
	}
	for k := range l.clients { // map order: arbitrary
		if len(l.clients) <= maxLimitedClients*7/8 {
			break
		}
		delete(l.clients, k)
	}
}

// wrap answers 429 with Retry-After to a client over its limit, and passes
// the others to next. A nil limiter passes everything.
func (l *limiter) wrap(next func(http.ResponseWriter, *http.Request)) func(http.ResponseWriter, *http.Request) {
	if l == nil {
		return next
	}
	return func(w http.ResponseWriter, r *http.Request) {
		key := clientKey(r.RemoteAddr)
		ok, wait := l.allow(key)
		if ok {
			next(w, r)
			return
		}
		l.refused.Inc()
		secs := max(1, int(math.Ceil(wait.Seconds())))
		l.log.note(key.String(), "rate limit: refused attempts on /_tether/"+l.endpoint, "rate_per_second", float64(l.limit), "burst", l.burst)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		writeJSON(w, http.StatusTooManyRequests, frames.HTTPError{Error: fmt.Sprintf("too many %s attempts from your address; retry in %ds", l.endpoint, secs)})
	}
}

// boundedLog logs a repeated event at most once per interval: the first
// at once, the later ones as one line carrying how many there were since
// the last line and from how many clients (the metrics count each).
type boundedLog struct {
	log      *slog.Logger
	interval time.Duration
	now      func() time.Time

	mu      sync.Mutex
	last    time.Time // of the last line
	count   int       // events since the last line
	clients map[string]struct{}
	first   string // a client of those
}

// maxLoggedClients bounds the distinct clients a boundedLog counts
// between two lines.
const maxLoggedClients = 1024

func newBoundedLog(log *slog.Logger, interval time.Duration) *boundedLog {
	return &boundedLog{log: log, interval: interval, now: time.Now, clients: map[string]struct{}{}}
}

// note records one event from client; it writes a line (msg, attrs, the
// count and clients since the last line) when the interval has passed.
func (b *boundedLog) note(client, msg string, attrs ...any) {
	now := b.now()
	b.mu.Lock()
	b.count++
	if len(b.clients) < maxLoggedClients {
		b.clients[client] = struct{}{}
	}
	if b.first == "" {
		b.first = client
	}
	if !b.last.IsZero() && now.Sub(b.last) < b.interval {
		b.mu.Unlock()
		return
	}
	count, clients, first := b.count, len(b.clients), b.first
	b.last, b.count, b.first = now, 0, ""
	clear(b.clients)
	b.mu.Unlock()
	b.log.Warn(msg, append(attrs, "count", count, "clients", clients, "client", first, "next_summary_after", b.interval)...)
}

// edgeLimits are the relay's per-client limits on its agent endpoints, and
// the bounded logs of what anyone may cause there at will.
type edgeLimits struct {
	connect, enroll *limiter // nil: no limit
	release         *limiter // /install.sh and /_tether/release/ (DefaultReleaseLimit)
	// Refused enrollments (bad tokens), refused upgrades (not a WebSocket)
	// and failed handshakes (unknown keys): one line per 10s with the
	// count, each at debug; the metrics count each.
	enrollRefusals, upgradeRefusals, handshakeFailures *boundedLog
}

func newEdgeLimits(cfg Config, log *slog.Logger, reg prometheus.Registerer) *edgeLimits {
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_rate_limited_total",
		Help: "Attempts on an agent endpoint refused with 429 because their client address was over its rate limit, by endpoint (connect, enroll, release)."}, []string{"endpoint"})
	if reg != nil {
		reg.MustRegister(refused)
	}
	return &edgeLimits{
		connect:        newLimiter("connect", cfg.ConnectLimit, DefaultConnectLimit, refused, log),
		enroll:         newLimiter("enroll", cfg.EnrollLimit, DefaultEnrollLimit, refused, log),
		release:        newLimiter("release", cfg.ReleaseLimit, DefaultReleaseLimit, refused, log),
		enrollRefusals: newBoundedLog(log, 10*time.Second), upgradeRefusals: newBoundedLog(log, 10*time.Second),
		handshakeFailures: newBoundedLog(log, 10*time.Second),
	}
}
