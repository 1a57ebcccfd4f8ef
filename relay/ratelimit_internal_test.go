package relay

import (
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// testLimiter is a limiter on a clock the test moves.
func testLimiter(l RateLimit) (*limiter, *time.Time) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lim := newLimiter("enroll", l, DefaultEnrollLimit, prometheus.NewCounterVec(prometheus.CounterOpts{Name: "x"}, []string{"endpoint"}), slog.New(slog.DiscardHandler))
	lim.now = func() time.Time { return now }
	return lim, &now
}

// TestClientKey: IPv4 by address (IPv4-mapped IPv6 too), IPv6 by /64.
func TestClientKey(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1:1", "192.0.2.1:2"},
		{"[::ffff:192.0.2.1]:1", "192.0.2.1:9"},
		{"[2001:db8:1:2::1]:1", "[2001:db8:1:2:ffff::9]:2"},
	} {
		if clientKey(tc.a) != clientKey(tc.b) {
			t.Errorf("%s and %s are different clients: %v %v", tc.a, tc.b, clientKey(tc.a), clientKey(tc.b))
		}
	}
	for _, tc := range []struct{ a, b string }{
		{"192.0.2.1:1", "192.0.2.2:1"},
		{"[2001:db8:1:2::1]:1", "[2001:db8:1:3::1]:1"},
	} {
		if clientKey(tc.a) == clientKey(tc.b) {
			t.Errorf("%s and %s share a bucket", tc.a, tc.b)
		}
	}
}

// TestLimiterBucket: the burst, then one per 1/rate with the wait said;
// a full bucket again after burst/rate.
func TestLimiterBucket(t *testing.T) {
	lim, now := testLimiter(RateLimit{PerSecond: 2, Burst: 5})
	k := clientKey("192.0.2.1:1")
	for i := range 5 {
		if ok, _ := lim.allow(k); !ok {
			t.Fatalf("attempt %d refused within the burst", i)
		}
	}
	ok, wait := lim.allow(k)
	if ok || wait != 500*time.Millisecond {
		t.Fatalf("past the burst: %v, wait %v, want refused for 500ms", ok, wait)
	}
	*now = now.Add(500 * time.Millisecond)
	if ok, _ := lim.allow(k); !ok {
		t.Fatal("refused after the wait it said")
	}
	if ok, _ := lim.allow(clientKey("192.0.2.2:1")); !ok {
		t.Fatal("another client refused")
	}
}

// TestLimiterMemoryBounded: a flood from ever new addresses keeps at most
// maxLimitedClients buckets, and a client in the middle of its refusals
// is not forgotten while full buckets are there to drop.
func TestLimiterMemoryBounded(t *testing.T) {
	lim, now := testLimiter(RateLimit{PerSecond: 1, Burst: 2})
	hot := clientKey("198.51.100.7:1")
	lim.allow(hot)
	lim.allow(hot)
	most := 0
	for i := range 3 * maxLimitedClients {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		lim.allow(netip.PrefixFrom(a, 32))
		most = max(most, len(lim.clients))
		if i%1000 == 0 {
			*now = now.Add(time.Second) // the others' buckets refill
			lim.allow(hot)              // hot keeps trying: its bucket stays empty
			lim.allow(hot)
		}
	}
	if most > maxLimitedClients {
		t.Fatalf("%d clients remembered, bound %d", most, maxLimitedClients)
	}
	t.Logf("FIGURE rate limiter: %d distinct addresses, at most %d buckets kept", 3*maxLimitedClients, most)
	if _, ok := lim.clients[hot]; !ok {
		t.Error("the client over its limit was forgotten while full buckets could go")
	}
}

// TestParseRate: the settings' grammar.
func TestParseRate(t *testing.T) {
	for in, want := range map[string]float64{"off": -1, "0": -1, "5": 5, "5/s": 5, "120/m": 2, "3600/h": 1, " 2/S ": 2, "0.5/s": 0.5} {
		if got, err := ParseRate(in); err != nil || got != want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "5/d", "-1", "NaN", "Inf/s", "1/s/s"} {
		if got, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q) = %v, want an error", in, got)
		}
	}
}
