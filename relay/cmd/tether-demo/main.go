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
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
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
	)
	demoAddr, closeDemo, err := serveDemoPage()
	if err != nil {
		return err
	}
	defer closeDemo()

	relay := exec.Command(filepath.Join(bin, "tether-relay"))
	relay.Env = append(os.Environ(), "TETHER_DATA_DIR="+data, "TETHER_LOG_FORMAT=text",
		"TETHER_HTTP_ADDR="+httpAddr, "TETHER_HTTPS_ADDR="+httpsAddr, "TETHER_DRAIN_WINDOW=1s")
	relay.Stdout, relay.Stderr = os.Stdout, os.Stderr
	if err := relay.Start(); err != nil {
		return fmt.Errorf("start relay (run make build first): %w", err)
	}
	relayDone := waitFor(relay)
	defer stopProcess(relay, relayDone)
	if err := waitReady(ctx, opsURL+"/readyz", relayDone); err != nil {
		return fmt.Errorf("relay: %w", err)
	}

	state := filepath.Join(data, "demo-agent")
	env := append(os.Environ(), "TETHER_RELAY_URL=wss://"+httpsAddr, "TETHER_RELAY_CA="+filepath.Join(data, "ca.pem"),
		"TETHER_STATE_DIR="+state, "TETHER_SERVICES=demo=http://"+demoAddr, "TETHER_LOG_FORMAT=text")
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
	agent := exec.Command(filepath.Join(bin, "tether-agent"))
	agent.Env = env
	agent.Stdout, agent.Stderr = os.Stdout, os.Stderr
	if err := agent.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	agentDone := waitFor(agent)
	defer stopProcess(agent, agentDone)

	host, err := waitLease(ctx, admin, agentDone)
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
	case err := <-relayDone:
		return fmt.Errorf("relay exited: %v", err)
	case err := <-agentDone:
		return fmt.Errorf("agent exited: %v", err)
	}
}

// waitFor returns a channel that yields the process's exit.
func waitFor(cmd *exec.Cmd) chan error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return done
}

// stopProcess sends SIGTERM to a process this program started and waits.
func stopProcess(cmd *exec.Cmd, done chan error) {
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		done <- err
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
	}
}

// waitReady polls url until it answers 200, the process exits, or 30s pass.
func waitReady(ctx context.Context, url string, exited chan error) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("exited before it was ready: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("not ready after 30s (%s)", url)
}

// waitLease waits until the demo service's lease is online and returns its hostname.
func waitLease(ctx context.Context, admin *httpapi.Client, exited chan error) (string, error) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ls, err := admin.Leases(ctx)
		if err == nil {
			for _, l := range ls {
				if l.Service == "demo" && l.Online && l.Relay != "" {
					return l.Hostname, nil
				}
			}
		}
		select {
		case err := <-exited:
			exited <- err
			return "", fmt.Errorf("exited before it registered: %v", err)
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return "", errors.New("not registered after 30s")
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
