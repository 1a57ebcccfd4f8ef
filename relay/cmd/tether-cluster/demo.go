package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"time"
)

// marker is in every answer of the demo page: a probe that sees it
// reached the device.
const marker = "Hello through Tether"

var page = template.Must(template.New("demo").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>Tether cluster demo</title>
<style>body{font-family:system-ui,sans-serif;max-width:42em;margin:3em auto;line-height:1.5}code{background:#eee;padding:0 .3em}</style></head>
<body><h1>` + marker + `</h1>
<p>This page is served by a service on the device, reached through one of the cluster's relays:
the device opened no inbound port, and its one session is held by one relay; the others forward to it.</p>
<ul>
<li>You asked for <code>{{.Host}}</code> over <code>{{.Proto}}</code>; your address as the relay saw it: <code>{{.For}}</code>.</li>
<li>Requests served since the device started: <b>{{.Count}}</b>.</li>
<li>Device time: {{.Now}}</li>
</ul>
<p>JSON: <a href="/api">/api</a></p>
</body></html>`))

// serveDemoPage serves the demo service on a free loopback port. The
// agent publishes it twice: as an HTTP service and as a raw TCP one.
func serveDemoPage() (string, func(), error) {
	var count atomic.Int64
	mux := http.NewServeMux()
	view := func(r *http.Request) map[string]any {
		proto := r.Header.Get("X-Forwarded-Proto")
		if proto == "" {
			proto = "tcp (raw lease)"
		}
		return map[string]any{"Host": r.Host, "Proto": proto, "For": r.Header.Get("X-Forwarded-For"),
			"Count": count.Add(1), "Now": time.Now().Format(time.RFC1123)}
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { page.Execute(w, view(r)) })
	mux.HandleFunc("/api", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		v := view(r)
		v["Greeting"] = marker
		json.NewEncoder(w).Encode(v)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return ln.Addr().String(), func() { srv.Close() }, nil
}

// probe is one way to reach the demo through one relay, as a curl
// command line and the same request made here.
type probe struct {
	curl string
	get  func(ctx context.Context) error
}

// httpProbe asks addr (a relay's plain-HTTP listener) for host's page.
func httpProbe(host, addr string) probe {
	return probe{
		curl: fmt.Sprintf("curl -H 'Host: %s' http://%s/", host, addr),
		get: func(ctx context.Context) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
			if err != nil {
				return err
			}
			req.Host = host
			return fetch(http.DefaultTransport, req)
		},
	}
}

// httpsProbe asks addr (a relay's HTTPS listener) for host's page over
// TLS, trusting only the cluster CA in caFile.
func httpsProbe(host, addr, caFile, caShown string) probe {
	_, port, _ := net.SplitHostPort(addr)
	ip, _, _ := net.SplitHostPort(addr)
	return probe{
		curl: fmt.Sprintf("curl --cacert %s --resolve %s:%s:%s https://%s:%s/", shellQuote(caShown), host, port, ip, host, port),
		get: func(ctx context.Context) error {
			pem, err := os.ReadFile(caFile)
			if err != nil {
				return err
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return fmt.Errorf("%s holds no certificate", caFile)
			}
			var d net.Dialer
			tr := &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: host},
				DialContext:     func(ctx context.Context, _, _ string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) },
			}
			defer tr.CloseIdleConnections()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+net.JoinHostPort(host, port)+"/", nil)
			if err != nil {
				return err
			}
			return fetch(tr, req)
		},
	}
}

// tcpProbe speaks HTTP over a TCP lease (the raw service is the same
// page): the bytes go through the tunnel untouched.
func tcpProbe(addr string) probe {
	return probe{
		curl: fmt.Sprintf("curl http://%s/", addr),
		get: func(ctx context.Context) error {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return err
			}
			defer c.Close()
			if dl, ok := ctx.Deadline(); ok {
				c.SetDeadline(dl)
			}
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				return fmt.Errorf("no HTTP answer through the lease: %w", err)
			}
			return check(resp)
		},
	}
}

func fetch(rt http.RoundTripper, req *http.Request) error {
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	return check(resp)
}

// check wants a 200 with the demo page; otherwise it says what came.
func check(resp *http.Response) error {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode == http.StatusOK && strings.Contains(string(b), marker) {
		return nil
	}
	return fmt.Errorf("%s: %s", resp.Status, gist(string(b)))
}

var tags = regexp.MustCompile(`(?is)<head>.*?</head>|<[^>]*>`)

// gist is the text of a page, shortened: what an error page says.
func gist(s string) string {
	s = strings.Join(strings.Fields(tags.ReplaceAllString(s, " ")), " ")
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// try runs p until it succeeds or within passes; the last error stays.
func (p probe) try(ctx context.Context, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, 3*time.Second)
		err := p.get(actx)
		acancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			if errors.Is(err, context.DeadlineExceeded) {
				err = fmt.Errorf("no answer in 3s")
			}
			return err
		case <-time.After(250 * time.Millisecond): // polling: presence reaches every relay without an event we can see
		}
	}
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n'\"\\$`!*?[]{}()<>|&;#~") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
