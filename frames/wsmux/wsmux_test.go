package wsmux_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/frames/wsmux/wsserver"
)

// echoServer accepts sessions and echoes every stream the client opens.
func echoServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s, err := wsserver.Accept(w, r, wsmux.Config{})
		if err != nil {
			return
		}
		wsmux.Config{}.Trust(s) // this echo server trusts anyone: the whole window
		defer s.Close()
		for {
			st, err := s.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				defer st.Close()
				io.Copy(st, st)
			}()
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func wsURL(s *httptest.Server) string { return "wss" + strings.TrimPrefix(s.URL, "https") }

func TestDialAcceptEcho(t *testing.T) {
	if err := (wsmux.Config{}).Verify(); err != nil {
		t.Fatal(err)
	}
	srv := echoServer(t)
	tlsConf := srv.Client().Transport.(*http.Transport).TLSClientConfig
	s, err := wsmux.Dial(t.Context(), wsURL(srv), wsmux.DialOptions{TLS: tlsConf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Several streams at once, each with more than one window of data.
	const n, size = 4, 3 << 20
	errs := make(chan error, n)
	for range n {
		go func() {
			st, err := s.OpenStream()
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			go func() {
				st.Write([]byte(strings.Repeat("x", size)))
				st.CloseWrite()
			}()
			got, err := io.ReadAll(st)
			if err == nil && len(got) != size {
				err = fmt.Errorf("short echo: %d of %d", len(got), size)
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestWrongSubprotocolRefusedBeforeSmux(t *testing.T) {
	srv := echoServer(t)
	tlsConf := srv.Client().Transport.(*http.Transport).TLSClientConfig
	_, resp, err := websocket.Dial(context.Background(), wsURL(srv), &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}},
		Subprotocols: []string{"tether.v0"},
	})
	if err == nil {
		t.Fatal("dial with an old subprotocol succeeded")
	}
	if resp == nil || resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("got response %v, want 426", resp)
	}
}

func TestDialRejectsServerWithoutSubprotocol(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil) // negotiates no subprotocol
		if err != nil {
			return
		}
		c.Read(r.Context())
	}))
	defer srv.Close()
	tlsConf := srv.Client().Transport.(*http.Transport).TLSClientConfig
	_, err := wsmux.Dial(t.Context(), wsURL(srv), wsmux.DialOptions{TLS: tlsConf})
	if !errors.Is(err, wsmux.ErrProtocol) {
		t.Fatalf("got %v, want ErrProtocol", err)
	}
}
