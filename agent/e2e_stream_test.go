package agent_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/relay/relaytest"
)

// streamingService serves /ws (WebSocket echo), /events (server-sent
// events, the second only after the test says so), /upload (sha256 of the
// body) and /download?n= (n pseudo-random bytes).
func streamingService(t *testing.T, next <-chan struct{}) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			c.Write(r.Context(), typ, append([]byte("echo:"), msg...))
		}
	})
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		fmt.Fprint(w, "data: two\n\n")
	})
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %s", n, hex.EncodeToString(h.Sum(nil)))
	})
	mux.HandleFunc("/download", func(w http.ResponseWriter, r *http.Request) {
		var n int64
		fmt.Sscan(r.URL.Query().Get("n"), &n)
		io.Copy(w, io.LimitReader(seeded(), n))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// seeded is a deterministic byte stream, so both ends can hash it.
func seeded() io.Reader { return &randReader{r: rand.New(rand.NewPCG(1, 2))} }

type randReader struct{ r *rand.Rand }

func (r *randReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r.r.Uint32())
	}
	return len(p), nil
}

func TestStreamingThroughTunnel(t *testing.T) {
	e := relaytest.Start(t, relaytest.Options{})
	next := make(chan struct{})
	svc := streamingService(t, next)
	startAgent(t, agentConfig(e, "", "pi01", e.Token(1), httpSvc("web", svc))).registered(t)

	t.Run("websocket upgrade", func(t *testing.T) {
		for _, scheme := range []string{"ws", "wss"} {
			c, _, err := websocket.Dial(t.Context(), scheme+"://web-pi01.localhost/ws", &websocket.DialOptions{HTTPClient: e.Client()})
			if err != nil {
				t.Fatalf("%s: %v", scheme, err)
			}
			for i := range 3 {
				msg := fmt.Sprintf("hi %d", i)
				if err := c.Write(t.Context(), websocket.MessageText, []byte(msg)); err != nil {
					t.Fatal(err)
				}
				_, got, err := c.Read(t.Context())
				if err != nil || string(got) != "echo:"+msg {
					t.Fatalf("%s: got %q %v", scheme, got, err)
				}
			}
			c.Close(websocket.StatusNormalClosure, "")
		}
	})

	t.Run("server-sent events arrive unbuffered", func(t *testing.T) {
		resp, err := e.Client().Get("https://web-pi01.localhost/events")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		r := bufio.NewReader(resp.Body)
		// The first event must arrive while the device still holds the second.
		if line, err := r.ReadString('\n'); err != nil || line != "data: one\n" {
			t.Fatalf("first event: %q %v", line, err)
		}
		close(next)
		r.ReadString('\n')
		if line, err := r.ReadString('\n'); err != nil || line != "data: two\n" {
			t.Fatalf("second event: %q %v", line, err)
		}
	})

	const size = 16 << 20
	want := sha256.New()
	io.Copy(want, io.LimitReader(seeded(), size))
	wantSum := hex.EncodeToString(want.Sum(nil))

	t.Run("large upload", func(t *testing.T) {
		resp, err := e.Client().Post("https://web-pi01.localhost/upload", "application/octet-stream", io.LimitReader(seeded(), size))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if string(got) != fmt.Sprintf("%d %s", size, wantSum) {
			t.Fatalf("device received %s", got)
		}
	})

	t.Run("large download", func(t *testing.T) {
		resp, err := e.Client().Get(fmt.Sprintf("http://web-pi01.localhost/download?n=%d", size))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil || n != size || hex.EncodeToString(h.Sum(nil)) != wantSum {
			t.Fatalf("downloaded %d bytes (%v), hash match %v", n, err, hex.EncodeToString(h.Sum(nil)) == wantSum)
		}
	})

	t.Run("many concurrent requests share the stream pool", func(t *testing.T) {
		errs := make(chan error, 50)
		for i := range 50 {
			go func() {
				body := strings.Repeat("x", i*1000)
				resp, err := e.Client().Post("http://web-pi01.localhost/upload", "text/plain", strings.NewReader(body))
				if err == nil {
					got, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if !bytes.HasPrefix(got, []byte(fmt.Sprintf("%d ", len(body)))) {
						err = fmt.Errorf("request %d: %s", i, got)
					}
				}
				errs <- err
			}()
		}
		for range 50 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	})
}
