package main_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/cross/harness"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// TestPreAuthMemory: clients that upgrade to a session and never
// authenticate cost the relay process little memory each, whether they
// sit idle or push 1 MiB on a stream nobody reads (the session's window
// is 16 KiB until the key is verified), and the handshake timeout closes
// them all. Before the small window, 50 such clients took a relay from 45
// to 260 MB (4.3 MB each).
func TestPreAuthMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the relay")
	}
	bin := harness.BuildT(t, "tether-relay")
	data := t.TempDir()
	addr := map[string]string{"https": freeAddr(t), "http": freeAddr(t), "ops": freeAddr(t), "admin": freeAddr(t)}
	relay := harness.StartT(t, harness.Cmd{Path: filepath.Join(bin, "tether-relay"), Env: []string{
		"TETHER_DATA_DIR=" + data, "TETHER_HTTPS_ADDR=" + addr["https"], "TETHER_HTTP_ADDR=" + addr["http"],
		"TETHER_OPS_ADDR=" + addr["ops"], "TETHER_ADMIN_ADDR=" + addr["admin"], "TETHER_TCP_HOST=127.0.0.1",
		"TETHER_TCP_PORTS=" + relaytest.FreePortRange(t, 2).String(), "TETHER_LOG_LEVEL=warn",
		// Every held connection gets a slot, however many come from one address.
		"TETHER_MAX_HANDSHAKES_PER_CLIENT=256",
	}})
	waitHTTP(t, "http://"+addr["ops"]+"/readyz", 200, relay)
	ca, err := os.ReadFile(filepath.Join(data, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	url := "wss://" + addr["https"] + frames.ConnectPath

	// attack opens a session and its control stream (silent: no hello);
	// a pushing one then opens a second stream and writes 1 MiB into it,
	// until the relay stops reading and the write deadline passes.
	attack := func(ctx context.Context, push bool) (*smux.Session, error) {
		ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: client, Subprotocols: []string{frames.Subprotocol}})
		if err != nil {
			return nil, err
		}
		mux, err := smux.Client(wsmux.NetConn(context.Background(), ws, false), wsmux.Config{}.Smux())
		if err != nil {
			return nil, err
		}
		if _, err := mux.OpenStream(); err != nil || !push {
			return mux, err
		}
		st, err := mux.OpenStream()
		if err != nil {
			return mux, err
		}
		st.SetWriteDeadline(time.Now().Add(2 * time.Second))
		st.Write(make([]byte, 1<<20))
		return mux, nil
	}
	warm, err := attack(t.Context(), true) // code paths touched once
	if err != nil {
		t.Fatal(err)
	}
	warm.Close()
	const n = 100
	var muxes []*smux.Session
	wave := func(push bool) int64 {
		rss0, _, err := relay.RSS()
		if err != nil {
			t.Skipf("no RSS: %v", err)
		}
		got := make([]*smux.Session, n)
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				m, err := attack(ctx, push)
				got[i] = m
				if err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("an unauthenticated connection: %v", err)
		}
		muxes = append(muxes, got...)
		rss1, _, _ := relay.RSS()
		return (rss1 - rss0) / n
	}
	idle, pushing := wave(false), wave(true)
	t.Logf("relay RSS per unauthenticated connection: %d KiB idle, %d KiB pushing 1 MiB (%d connections each)", idle>>10, pushing>>10, n)
	// The floor is the connection itself: TLS, HTTP, WebSocket, an smux
	// session and its three goroutines, the relay's writer.
	if idle > 96<<10 || pushing > 160<<10 {
		t.Errorf("relay RSS per unauthenticated connection: %d KiB idle, %d KiB pushing; want at most 96 and 160", idle>>10, pushing>>10)
	}
	// The handshake timeout (10s) closes every one of them.
	closed := 0
	for _, m := range muxes {
		m.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := m.AcceptStream(); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, smux.ErrTimeout) {
			closed++ // the relay closed the connection
		}
		m.Close()
	}
	if closed != len(muxes) {
		t.Errorf("%d of %d unauthenticated sessions closed by the relay within its handshake timeout", closed, len(muxes))
	}
}
