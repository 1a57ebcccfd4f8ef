// Command tether-demo is what `make run` starts: the real tether-relay
// (standalone, state in ./tether-data) and a real tether-agent exposing a
// small demo web page, then it prints the URL to open. A second run reuses
// the same state, so the device keeps its identity and its URL. Ctrl-C
// stops everything.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/cross/harness"
)

func main() {
	bin := flag.String("bin", "./bin", "directory holding tether-relay and tether-agent")
	data := flag.String("data", "./tether-data", "relay data dir (the agent's state goes in its demo-agent subdir)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *bin, *data); err != nil {
		fmt.Fprintln(os.Stderr, "tether-demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, bin, data string) error {
	const (
		httpAddr, httpsAddr = "127.0.0.1:8080", "127.0.0.1:8443"
		opsURL, adminURL    = "http://127.0.0.1:7071", "http://127.0.0.1:7070"
		stopGrace           = 15 * time.Second
	)
	demoAddr, closeDemo, err := serveDemoPage()
	if err != nil {
		return err
	}
	defer closeDemo()

	relay, err := harness.Start(harness.Cmd{Path: filepath.Join(bin, "tether-relay"), Stdout: os.Stdout, Stderr: os.Stderr,
		Env: []string{"TETHER_DATA_DIR=" + data, "TETHER_LOG_FORMAT=text",
			"TETHER_HTTP_ADDR=" + httpAddr, "TETHER_HTTPS_ADDR=" + httpsAddr, "TETHER_DRAIN_WINDOW=1s"}})
	if err != nil {
		return fmt.Errorf("%w (run make build first)", err)
	}
	defer relay.Stop(stopGrace)
	if err := harness.WaitHTTP(ctx, opsURL+"/readyz", http.StatusOK, 30*time.Second, relay); err != nil {
		return fmt.Errorf("relay: %w", err)
	}

	state := filepath.Join(data, "demo-agent")
	env := []string{"TETHER_RELAY_URL=wss://" + httpsAddr, "TETHER_RELAY_CA=" + filepath.Join(data, "ca.pem"),
		"TETHER_STATE_DIR=" + state, "TETHER_SERVICES=demo=http://" + demoAddr, "TETHER_LOG_FORMAT=text"}
	adminToken, err := os.ReadFile(filepath.Join(data, "admin-token"))
	if err != nil {
		return fmt.Errorf("read admin token: %w", err)
	}
	admin := &httpapi.Client{BaseURL: adminURL, Token: strings.TrimSpace(string(adminToken))}
	if _, err := os.Stat(filepath.Join(state, "device.json")); errors.Is(err, os.ErrNotExist) {
		tok, err := admin.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: 1, TTL: "10m", Labels: map[string]string{"demo": "true"}})
		if err != nil {
			return fmt.Errorf("create enrollment token: %w", err)
		}
		env = append(env, "TETHER_ENROLL_TOKEN="+tok.Secret)
	}
	agent, err := harness.Start(harness.Cmd{Path: filepath.Join(bin, "tether-agent"), Env: env, Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		return err
	}
	defer agent.Stop(stopGrace)

	var host string
	err = harness.Poll(ctx, 30*time.Second, func() error {
		ls, err := admin.Leases(ctx)
		if err != nil {
			return err
		}
		for _, l := range ls {
			if l.Service == "demo" && l.Online && l.Relay != "" {
				host = l.Hostname
				return nil
			}
		}
		return errors.New("the demo service is not registered")
	}, agent, relay)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	_, httpPort, _ := net.SplitHostPort(httpAddr)
	_, httpsPort, _ := net.SplitHostPort(httpsAddr)
	fmt.Printf(`
  Tether demo is running: a standalone relay and an agent publishing a demo page.

    Open    http://%[1]s:%[2]s/
            https://%[1]s:%[3]s/   (dev CA: %[4]s)
    Try     curl -H 'Host: %[1]s' http://127.0.0.1:%[2]s/
            bin/tetherctl devices        bin/tetherctl leases
    State   %[5]s (admin token in %[5]s/admin-token)

  Ctrl-C stops everything; a second make run brings back the same URL.

`, host, httpPort, httpsPort, filepath.Join(data, "ca.pem"), data)

	select {
	case <-ctx.Done():
		fmt.Println("\nstopping...")
		return nil
	case <-relay.Done():
		return fmt.Errorf("relay exited: %v", relay.Err())
	case <-agent.Done():
		return fmt.Errorf("agent exited: %v", agent.Err())
	}
}

var page = template.Must(template.New("demo").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>Tether demo</title>
<style>body{font-family:system-ui,sans-serif;max-width:42em;margin:3em auto;line-height:1.5}code{background:#eee;padding:0 .3em}</style></head>
<body><h1>Hello through Tether</h1>
<p>This page is served by a service on the device, reached through the relay's tunnel: the device opened no inbound port.</p>
<ul>
<li>You asked for <code>{{.Host}}</code> over <code>{{.Proto}}</code>; the relay forwarded your address as <code>{{.For}}</code>.</li>
<li>Requests served since the device started: <b>{{.Count}}</b>.</li>
<li>Device time: {{.Now}}</li>
</ul>
<p>JSON: <a href="/api">/api</a></p>
</body></html>`))

// serveDemoPage serves the demo service on a free loopback port.
func serveDemoPage() (string, func(), error) {
	var count atomic.Int64
	mux := http.NewServeMux()
	view := func(r *http.Request) map[string]any {
		return map[string]any{"Host": r.Host, "Proto": r.Header.Get("X-Forwarded-Proto"), "For": r.Header.Get("X-Forwarded-For"),
			"Count": count.Add(1), "Now": time.Now().Format(time.RFC1123)}
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { page.Execute(w, view(r)) })
	mux.HandleFunc("/api", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(view(r))
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	return ln.Addr().String(), func() { srv.Close() }, nil
}
