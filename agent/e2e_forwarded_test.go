package agent_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/relay/relaytest"
)

// TestClientForwardingHeadersDropped: a public client cannot tell the
// device where it comes from. Its X-Real-IP, X-Forwarded-*, Forwarded,
// True-Client-IP and CF-Connecting-IP do not reach the device; the
// relay's own X-Forwarded-For and RFC 7239 Forwarded, with the address
// the relay saw, do. Through the real relay and agent, over HTTP and
// HTTPS, from 127.0.0.3.
func TestClientForwardingHeadersDropped(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	seen := make(chan http.Header, 2)
	device := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		w.Write([]byte("ok"))
	}))
	t.Cleanup(device.Close)
	ra := startAgent(t, agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", device)))
	ra.registered(t)

	client := e.Client()
	tr := client.Transport.(*http.Transport)
	// The relay's listeners are on 127.0.0.1: come from 127.0.0.3.
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		target := e.HTTPAddr()
		if strings.HasSuffix(addr, ":443") {
			target = e.HTTPSAddr()
		}
		return (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}}).DialContext(ctx, network, target)
	}
	spoofed := map[string]string{
		"X-Real-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example",
		"X-Forwarded-Proto": "gopher", "X-Forwarded-Port": "1", "Forwarded": "for=6.6.6.6;proto=gopher",
		"True-Client-IP": "6.6.6.6", "CF-Connecting-IP": "6.6.6.6",
	}
	for _, scheme := range []string{"http", "https"} {
		req, _ := http.NewRequest(http.MethodGet, scheme+"://web-pi01.localhost/", nil)
		for k, v := range spoofed {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: status %d", scheme, resp.StatusCode)
		}
		h := <-seen
		got, _ := json.Marshal(h)
		for k, v := range spoofed {
			for _, have := range h.Values(k) {
				if strings.Contains(have, v) {
					t.Errorf("%s: the client's %s: %s reached the device: %s", scheme, k, v, got)
				}
			}
		}
		if h.Get("X-Real-IP") != "" || h.Get("True-Client-IP") != "" || h.Get("CF-Connecting-IP") != "" || h.Get("X-Forwarded-Port") != "" {
			t.Errorf("%s: a client address header reached the device: %s", scheme, got)
		}
		want := map[string]string{
			"X-Forwarded-For":   "127.0.0.3",
			"X-Forwarded-Proto": scheme,
			"X-Forwarded-Host":  "web-pi01.localhost",
			"Forwarded":         "for=127.0.0.3;proto=" + scheme + ";host=web-pi01.localhost",
		}
		for k, v := range want {
			if vs := h.Values(k); len(vs) != 1 || vs[0] != v {
				t.Errorf("%s: device got %s %q, want %q", scheme, k, vs, v)
			}
		}
		t.Logf("FIGURE forwarding headers (%s): client sent %d spoofed address headers; the device saw X-Forwarded-For %q, Forwarded %q, X-Real-IP %q",
			scheme, len(spoofed), h.Get("X-Forwarded-For"), h.Get("Forwarded"), h.Get("X-Real-IP"))
	}
}
