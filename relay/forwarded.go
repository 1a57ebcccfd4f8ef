package relay

import (
	"net"
	"net/http/httputil"
	"net/netip"
	"strings"
)

// clientAddressHeaders are the headers by which proxies and CDNs tell the
// service behind them about a request: its client, scheme or original URL.
// A public client can set any of them, so the relay never passes them on:
// the device learns the client's address from the headers the relay
// writes itself (setForwarded). httputil.ReverseProxy already drops
// Forwarded and X-Forwarded-{For,Host,Proto} when Rewrite is set; every
// other X-Forwarded-* goes too. X-Original-URL and X-Rewrite-URL, which
// IIS, Symfony and Laravel take as the request's path, would get round a
// service's path-based rules.
var clientAddressHeaders = []string{
	"Forwarded", "X-Real-Ip", "True-Client-Ip", "Cf-Connecting-Ip", "Cf-Connecting-Ipv6",
	"X-Client-Ip", "X-Cluster-Client-Ip", "Fastly-Client-Ip", "X-Original-Forwarded-For",
	"X-Originating-Ip", "X-Remote-Ip", "X-Remote-Addr", "Client-Ip",
	"Forwarded-For", "X-Forwarded", "X-Proxyuser-Ip", "X-Real-Client-Ip", "Via-Client-Ip",
	"X-Envoy-External-Address", "X-Original-Url", "X-Rewrite-Url", "Front-End-Https", "X-Url-Scheme",
}

// setForwarded replaces whatever the public client said about where it
// came from with what the relay saw: X-Forwarded-For (the client's
// address), X-Forwarded-Host and -Proto, and the same in one RFC 7239
// Forwarded header: for=ADDR;proto=http|https;host="HOST".
func setForwarded(pr *httputil.ProxyRequest) {
	h := pr.Out.Header
	for _, k := range clientAddressHeaders {
		h.Del(k)
	}
	for k := range h {
		if strings.HasPrefix(k, "X-Forwarded-") {
			delete(h, k)
		}
	}
	pr.SetXForwarded() // For from In.RemoteAddr only: the inbound header was dropped above
	proto := "http"
	if pr.In.TLS != nil {
		proto = "https"
	}
	fwd := "proto=" + proto + ";host=" + quoteForwarded(pr.In.Host)
	if ap, err := netip.ParseAddrPort(pr.In.RemoteAddr); err == nil {
		fwd = "for=" + forwardedNode(ap.Addr().Unmap()) + ";" + fwd
	} else if host, _, err := net.SplitHostPort(pr.In.RemoteAddr); err == nil && host != "" {
		fwd = "for=" + quoteForwarded(host) + ";" + fwd
	}
	h.Set("Forwarded", fwd)
}

// forwardedNode is an RFC 7239 node: an IPv4 address as it is, an IPv6
// address in quoted brackets.
func forwardedNode(a netip.Addr) string {
	if a.Is6() {
		return `"[` + a.String() + `]"`
	}
	return a.String()
}

// quoteForwarded returns v as an RFC 7239 value: a token as it is, else a
// quoted string (with '"' and '\' escaped).
func quoteForwarded(v string) string {
	token := v != ""
	for _, c := range v {
		if !isTokenChar(c) {
			token = false
			break
		}
	}
	if token {
		return v
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range v {
		if c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	b.WriteByte('"')
	return b.String()
}

// isTokenChar reports whether c may appear in an HTTP token (RFC 9110 tchar).
func isTokenChar(c rune) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return c < 0x80 && strings.ContainsRune("!#$%&'*+-.^_`|~", c)
}
