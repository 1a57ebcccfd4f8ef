package wsserver_test

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/frames/wsmux/wsserver"
)

// TestEagerClient: a client that sends its first WebSocket frames with the
// upgrade request, before the 101 (so net/http has read them into its
// buffer), loses none of them when Accept swaps in its smaller buffers.
func TestEagerClient(t *testing.T) {
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mux, err := wsserver.Accept(w, r, wsmux.Config{})
		if err != nil {
			got <- "accept: " + err.Error()
			return
		}
		defer mux.Close()
		mux.SetDeadline(time.Now().Add(10 * time.Second))
		st, err := mux.AcceptStream()
		if err != nil {
			got <- "accept stream: " + err.Error()
			return
		}
		defer st.Close()
		st.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 5)
		if _, err := io.ReadFull(st, b); err != nil {
			got <- "read: " + err.Error()
			return
		}
		got <- string(b)
	}))
	defer srv.Close()

	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := upgradeRequest()
	// smux v2: a SYN for stream 1, then "hello" on it; each frame a masked
	// binary WebSocket message, all in the request's one write.
	smuxFrame := func(cmd byte, payload string) []byte {
		h := make([]byte, 8, 8+len(payload))
		h[0], h[1] = 2, cmd
		binary.LittleEndian.PutUint16(h[2:], uint16(len(payload)))
		binary.LittleEndian.PutUint32(h[4:], 1)
		return append(h, payload...)
	}
	wsFrame := func(p []byte) []byte {
		mask := []byte{1, 2, 3, 4}
		f := append([]byte{0x82, 0x80 | byte(len(p))}, mask...)
		for i, b := range p {
			f = append(f, b^mask[i%4])
		}
		return f
	}
	out := []byte(req)
	out = append(out, wsFrame(smuxFrame(0, ""))...)      // cmdSYN
	out = append(out, wsFrame(smuxFrame(2, "hello"))...) // cmdPSH
	if _, err := c.Write(out); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %s", resp.Status)
	}
	select {
	case s := <-got:
		if s != "hello" {
			t.Fatalf("the server read %q, want the eager client's %q", s, "hello")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the server never read the eager client's frames")
	}
}

// TestRefusesOtherProtocols: a client that does not offer the protocol's
// subprotocol gets 426 naming it, and no upgrade.
func TestRefusesOtherProtocols(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := wsserver.Accept(w, r, wsmux.Config{}); err == nil {
			t.Error("accepted a client without the subprotocol")
		}
	}))
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+frames.ConnectPath, nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString([]byte("0123456789abcdef")))
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Protocol", "tether.v0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired || !strings.Contains(resp.Header.Get("Sec-WebSocket-Protocol"), frames.Subprotocol) {
		t.Fatalf("got %s with Sec-WebSocket-Protocol %q; want 426 naming %s", resp.Status, resp.Header.Get("Sec-WebSocket-Protocol"), frames.Subprotocol)
	}
}

// TestCloseIsBounded: a client that declares a huge WebSocket message and
// goes quiet cannot hold the connection once the server closes the session
// (coder/websocket's close handshake skips the rest of the message being
// read with no deadline of its own): the server's end goes within
// wsmux.CloseWait.
func TestCloseIsBounded(t *testing.T) {
	closed := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mux, err := wsserver.Accept(w, r, wsmux.Config{})
		if err != nil {
			t.Error(err)
			return
		}
		// The session's reader is in the middle of the message: end it, as
		// the relay does when a handshake fails.
		mux.SetDeadline(time.Now().Add(10 * time.Second))
		mux.AcceptStream()
		mux.Close()
		close(closed)
	}))
	defer srv.Close()
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, upgradeRequest())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	// A binary message of 1 GiB (64-bit length), masked, then 8 bytes that
	// are no smux frame: the session ends with a protocol error.
	hdr := []byte{0x82, 0x80 | 127, 0, 0, 0, 0x40, 0, 0, 0, 0, 1, 2, 3, 4}
	if _, err := c.Write(append(hdr, 9, 9, 9, 9, 9, 9, 9, 9)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("the server's Close did not return")
	}
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(wsmux.CloseWait + 10*time.Second))
	_, err = io.Copy(io.Discard, br) // the close frame, then the end
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the server still holds the connection %v after closing the session", time.Since(start).Round(time.Second))
	}
}

// upgradeRequest is an agent's WebSocket upgrade, written by hand.
func upgradeRequest() string {
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef"))
	return fmt.Sprintf("GET %s HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
		frames.ConnectPath, key, frames.Subprotocol)
}
