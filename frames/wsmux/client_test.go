package wsmux

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

func tlsConf(srv *httptest.Server) *tls.Config {
	return srv.Client().Transport.(*http.Transport).TLSClientConfig
}

func wssURL(srv *httptest.Server) string { return "wss" + strings.TrimPrefix(srv.URL, "https") }

// TestClientAgainstCoderServer: pings from the server are answered, binary
// messages of every length class arrive intact both ways, and a close from
// the server ends reads with io.EOF.
func TestClientAgainstCoderServer(t *testing.T) {
	done := make(chan error, 1)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{subprotocol}})
		if err != nil {
			done <- err
			return
		}
		c.SetReadLimit(-1) // as NetConn does on the relay
		pinged := make(chan error, 1)
		go func() { pinged <- c.Ping(r.Context()) }() // its pong is seen by the reads below
		done <- func() error {
			for _, n := range []int{0, 1, 125, 126, 65535, 65536, 1 << 20} {
				typ, msg, err := c.Read(r.Context())
				if err != nil || typ != websocket.MessageBinary || len(msg) != n {
					return fmt.Errorf("message of %d: got %d bytes, %v", n, len(msg), err)
				}
				if err := c.Write(r.Context(), websocket.MessageBinary, msg); err != nil {
					return err
				}
			}
			if err := <-pinged; err != nil {
				return fmt.Errorf("ping: %w", err)
			}
			return c.Close(websocket.StatusNormalClosure, "bye")
		}()
	}))
	defer srv.Close()
	c, err := dialWebSocket(t.Context(), wssURL(srv), DialOptions{TLS: tlsConf(srv)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Reading serves the ping; run it while the server waits for the pong.
	// Data and the final error come through one channel, in order.
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 64)
	go func() {
		buf := make([]byte, 2<<20)
		for {
			n, err := c.Read(buf)
			if err != nil {
				got <- result{err: err}
				return
			}
			got <- result{b: bytes.Clone(buf[:n])}
		}
	}()
	for _, n := range []int{0, 1, 125, 126, 65535, 65536, 1 << 20} {
		msg := bytes.Repeat([]byte{byte(n)}, n)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		var echo []byte
		for len(echo) < n {
			r := <-got
			if r.err != nil {
				t.Fatalf("read while waiting for the echo of %d bytes: %v (server: %v)", n, r.err, <-done)
			}
			echo = append(echo, r.b...)
		}
		if !bytes.Equal(echo, msg) {
			t.Fatalf("echo of %d bytes differs", n)
		}
	}
	if r := <-got; !errors.Is(r.err, io.EOF) {
		t.Fatalf("after server close: %v", r.err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestHandshakeRefusal(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "relay is draining", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	_, err := Dial(t.Context(), wssURL(srv), DialOptions{TLS: tlsConf(srv)})
	var he *HandshakeError
	if !errors.As(err, &he) || he.Status != 503 || !strings.Contains(he.Body, "draining") {
		t.Fatalf("got %v", err)
	}
}

func TestPostThroughProxy(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			w.WriteHeader(http.StatusCreated)
			if chunked {
				w.(http.Flusher).Flush() // no Content-Length: the body is chunked
			}
			fmt.Fprintf(w, `{"got":%q}`, b)
		}))
		defer srv.Close()
		proxied := make(chan string, 1)
		proxy := connectProxy(t, proxied)
		t.Setenv("HTTPS_PROXY", "http://"+proxy)
		status, body, err := Post(t.Context(), srv.URL+"/enroll", []byte("hello"), DialOptions{TLS: tlsConf(srv)})
		if err != nil || status != 201 || string(body) != `{"got":"hello"}` {
			t.Fatalf("chunked=%v: %d %q %v", chunked, status, body, err)
		}
		if target := <-proxied; target != srv.Listener.Addr().String() {
			t.Fatalf("proxy saw CONNECT %s", target)
		}
	}
}

// connectProxy is a minimal HTTP CONNECT proxy; it reports each target.
func connectProxy(t *testing.T, targets chan<- string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				line, _ := br.ReadString('\n')
				for {
					h, err := br.ReadString('\n')
					if err != nil || h == "\r\n" {
						break
					}
				}
				target := strings.Fields(line)[1]
				targets <- target
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
				go io.Copy(up, br)
				io.Copy(c, up)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestMask(t *testing.T) {
	key := [4]byte{1, 2, 3, 4}
	for n := range 40 {
		b := bytes.Repeat([]byte{0xAA}, n)
		mask(b, key)
		for i, v := range b {
			if v != 0xAA^key[i%4] {
				t.Fatalf("n=%d: byte %d = %x", n, i, v)
			}
		}
	}
}

// discardConn is a net.Conn whose writes vanish, for feeding a wsConn
// reader from a byte slice.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error) { return len(p), nil }
func (discardConn) Close() error                { return nil }

// FuzzRead feeds arbitrary server bytes, in two pieces, to the frame
// reader: it must never panic nor hang, and a clean binary frame must
// decode to its payload.
func FuzzRead(f *testing.F) {
	frame := func(op byte, p []byte) []byte {
		b := []byte{0x80 | op, byte(len(p))}
		return append(b, p...)
	}
	f.Add(frame(opBinary, []byte("hello")), uint8(3))
	f.Add(append(frame(opPing, []byte("p")), frame(opBinary, []byte("x"))...), uint8(1))
	f.Add(frame(opClose, []byte{3, 232}), uint8(0))
	f.Add([]byte{0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint8(5))
	f.Add([]byte{0x82, 126, 0, 3, 'a', 'b', 'c'}, uint8(4))
	f.Fuzz(func(t *testing.T, data []byte, cut uint8) {
		split := int(cut) % (len(data) + 1)
		r := io.MultiReader(bytes.NewReader(data[:split]), bytes.NewReader(data[split:]))
		c := &wsConn{Conn: discardConn{}, br: bufio.NewReader(r)}
		buf := make([]byte, 4096)
		total := 0
		for range 1000 {
			n, err := c.Read(buf)
			total += n
			if err != nil {
				break
			}
		}
		if total > len(data) {
			t.Fatalf("read %d payload bytes from %d input bytes", total, len(data))
		}
		if len(data) >= 2 && data[0] == 0x82 && data[1] < 126 && int(data[1]) == len(data)-2 {
			c := &wsConn{Conn: discardConn{}, br: bufio.NewReader(bytes.NewReader(data))}
			got, _ := io.ReadAll(c)
			if !bytes.Equal(got, data[2:]) {
				t.Fatalf("payload %q, want %q", got, data[2:])
			}
		}
	})
}
