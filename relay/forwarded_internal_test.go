package relay

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"testing"
)

// TestSetForwarded: RFC 7239 values (IPv6 quoted in brackets, a host with
// a port quoted), and every client-set forwarding header replaced.
func TestSetForwarded(t *testing.T) {
	for _, tc := range []struct {
		remote, host string
		tls          bool
		want, xff    string
	}{
		{"192.0.2.7:5000", "web-pi01.example.com", false, "for=192.0.2.7;proto=http;host=web-pi01.example.com", "192.0.2.7"},
		{"[2001:db8::7]:5000", "web-pi01.example.com:8443", true, `for="[2001:db8::7]";proto=https;host="web-pi01.example.com:8443"`, "2001:db8::7"},
		{"[::ffff:192.0.2.7]:5000", "a.b", false, "for=192.0.2.7;proto=http;host=a.b", "::ffff:192.0.2.7"},
	} {
		in := httptest.NewRequest(http.MethodGet, "http://"+tc.host+"/", nil)
		in.RemoteAddr, in.Host = tc.remote, tc.host
		if tc.tls {
			in.TLS = &tls.ConnectionState{}
		}
		for _, k := range append(clientAddressHeaders, "X-Forwarded-For", "X-Forwarded-Port", "X-Forwarded-Ssl") {
			in.Header.Set(k, "6.6.6.6")
		}
		pr := &httputil.ProxyRequest{In: in, Out: in.Clone(in.Context())}
		pr.Out.Header.Del("Forwarded") // as ReverseProxy does before Rewrite
		pr.Out.Header.Del("X-Forwarded-For")
		setForwarded(pr)
		h := pr.Out.Header
		if got := h.Get("Forwarded"); got != tc.want {
			t.Errorf("%s: Forwarded %q, want %q", tc.remote, got, tc.want)
		}
		if got := h.Get("X-Forwarded-For"); got != tc.xff {
			t.Errorf("%s: X-Forwarded-For %q, want %q", tc.remote, got, tc.xff)
		}
		for k, vs := range h {
			for _, v := range vs {
				if v == "6.6.6.6" {
					t.Errorf("%s: the client's %s reached the device", tc.remote, k)
				}
			}
		}
	}
	if got := quoteForwarded(`a"b\c`); got != `"a\"b\\c"` {
		t.Errorf("quoteForwarded: %s", got)
	}
}
