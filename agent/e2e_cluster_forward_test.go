package agent_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// The e2e_cluster*_test.go files run real agents against a cluster on
// loopback (relaytest.StartCluster): three NATS servers, the control
// plane, and relays on 127.0.0.1, .2 and .3.

// publicAddr is where the tests' public clients connect from, so that
// X-Forwarded-For can be told from the relays' own addresses.
const publicAddr = "127.0.0.9"

// clusterDevice is a device of a cluster test: its agent and its leases.
type clusterDevice struct {
	name   string
	agent  *runningAgent
	leases map[string]frames.Lease // by service
}

// startClusterDevice enrolls and starts device name with services web
// (webService), stream (streamingService) and ssh (relaytest.LineService),
// its agent given relay URLs urls in order.
func startClusterDevice(t *testing.T, c *relaytest.Cluster, name string, urls []string, services ...agent.Service) *clusterDevice {
	t.Helper()
	cfg := agentConfig(c.Env, "", name, c.Token(1), services...)
	cfg.RelayURLs = urls
	d := &clusterDevice{name: name, agent: startAgent(t, cfg), leases: map[string]frames.Lease{}}
	for _, l := range d.agent.registered(t) {
		d.leases[l.Service] = l
	}
	return d
}

// publicClient sends every request to relay n from publicAddr, trusting
// the cluster root, as a browser resolving *.localhost to n would.
func publicClient(c *relaytest.Cluster, n *relaytest.Node) *http.Client {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(publicAddr)}}
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			target := n.HTTPAddr
			if strings.HasSuffix(addr, ":443") {
				target = n.HTTPSAddr
			}
			return dialer.DialContext(ctx, network, target)
		},
		TLSClientConfig:   &tls.Config{RootCAs: c.CA.Pool()},
		DisableKeepAlives: true,
	}}
}

// TestClusterForwarding: any relay serves any device, wherever its agent
// is connected: HTTP with the public client's address in
// X-Forwarded-For, TCP with half-close; and for a device on another
// relay, WebSocket, server-sent events unbuffered and 16 MiB both ways.
func TestClusterForwarding(t *testing.T) {
	c := relaytest.StartCluster(t, 3, relaytest.Options{})
	c.AwaitMembers()
	next := make(chan struct{})
	web, stream, ssh := webService(t), streamingService(t, next), relaytest.LineService(t)
	services := []agent.Service{httpSvc("web", web), httpSvc("stream", stream), {Name: "ssh", Proto: "tcp", Addr: ssh}}
	var devices []*clusterDevice // device i on relay i
	for i, n := range c.Relays {
		devices = append(devices, startClusterDevice(t, c, fmt.Sprintf("pi%d", i+1), []string{n.URL()}, services...))
	}

	for _, d := range devices {
		for _, n := range c.Relays {
			t.Run(d.name+" via "+n.ID, func(t *testing.T) {
				client := publicClient(c, n)
				host := d.leases["web"].Hostname
				relaytest.Eventually(t, 10*time.Second, func() error { // the relay learns presence from events
					code, body := get(client, "https://"+host+"/x")
					if code != 200 || !strings.Contains(body, "host="+host+" xff="+publicAddr+" proto=https") {
						return fmt.Errorf("%d %s", code, body)
					}
					return nil
				})
				checkLineService(t, n, d.leases["ssh"].Port)
			})
		}
	}

	const size = 16 << 20
	want := sha256.New()
	io.Copy(want, io.LimitReader(seeded(), size))
	wantSum := hex.EncodeToString(want.Sum(nil))
	for i, n := range c.Relays {
		d := devices[(i+1)%len(devices)] // held by the next relay
		host := d.leases["stream"].Hostname
		client := publicClient(c, n)
		t.Run("streaming "+d.name+" via "+n.ID, func(t *testing.T) {
			ws, _, err := websocket.Dial(t.Context(), "wss://"+host+"/ws", &websocket.DialOptions{HTTPClient: client})
			if err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				msg := fmt.Sprintf("hi %d", i)
				if err := ws.Write(t.Context(), websocket.MessageText, []byte(msg)); err != nil {
					t.Fatal(err)
				}
				if _, got, err := ws.Read(t.Context()); err != nil || string(got) != "echo:"+msg {
					t.Fatalf("websocket: %q %v", got, err)
				}
			}
			ws.Close(websocket.StatusNormalClosure, "")

			resp, err := client.Get("https://" + host + "/events")
			if err != nil {
				t.Fatal(err)
			}
			r := bufio.NewReader(resp.Body)
			// The first event arrives while the device still holds the second.
			if line, err := r.ReadString('\n'); err != nil || line != "data: one\n" {
				t.Fatalf("first event: %q %v", line, err)
			}
			next <- struct{}{}
			r.ReadString('\n')
			if line, err := r.ReadString('\n'); err != nil || line != "data: two\n" {
				t.Fatalf("second event: %q %v", line, err)
			}
			resp.Body.Close()

			resp, err = client.Post("https://"+host+"/upload", "application/octet-stream", io.LimitReader(seeded(), size))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(got) != fmt.Sprintf("%d %s", size, wantSum) {
				t.Fatalf("device received %s", got)
			}

			resp, err = client.Get(fmt.Sprintf("http://%s/download?n=%d", host, size))
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			m, err := io.Copy(h, resp.Body)
			resp.Body.Close()
			if err != nil || m != size || hex.EncodeToString(h.Sum(nil)) != wantSum {
				t.Fatalf("downloaded %d bytes (%v), hash match %v", m, err, hex.EncodeToString(h.Sum(nil)) == wantSum)
			}
		})
	}
	if n := c.Relays[0].Counter("tether_relay_forwarded_streams_total", "relay-2"); n == 0 {
		t.Error("relay-1 counted no stream forwarded to relay-2")
	}
}

// checkLineService talks to the line service (relaytest.LineService)
// leased at port through relay n: a line, then a half-close, after which
// the service still answers in full.
func checkLineService(t *testing.T, n *relaytest.Node, port uint16) {
	t.Helper()
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(publicAddr)}, Timeout: 5 * time.Second}
	conn, err := dialer.Dial("tcp", net.JoinHostPort(n.Host, fmt.Sprint(port)))
	if err != nil {
		t.Fatalf("dial port %d on relay %s: %v", port, n.ID, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintln(conn, "hello")
	conn.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != "HELLO\nbye\n" {
		t.Fatalf("port %d on relay %s: %q %v", port, n.ID, got, err)
	}
}

// get fetches url with client; status 0 and the error when it fails.
func get(client *http.Client, url string) (int, string) {
	resp, err := client.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
