package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// These tests play a hostile relay against the agent, on loopback: its
// answers to enrollment and the frames of a session, valid, truncated,
// oversized or nonsense. The agent may refuse anything; it must never
// panic nor hang.

// rawServer is a loopback TCP server that reads one HTTP request per
// connection and answers with whatever bytes answer() returns, then
// closes its side for writing (the agent sees the end of the answer).
type rawServer struct {
	ln     net.Listener
	answer atomic.Pointer[[]byte]
	conns  atomic.Int32
	wg     sync.WaitGroup
}

func newRawServer(tb testing.TB) *rawServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s := &rawServer{ln: ln}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			s.wg.Go(func() { s.serve(c) })
		}
	})
	tb.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *rawServer) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	io.Copy(io.Discard, io.LimitReader(req.Body, 1<<20))
	if p := s.answer.Load(); p != nil {
		c.Write(*p)
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, br) // until the agent closes
}

// hostileAgent is an agent whose every connection goes to addr, over
// ws:// (the hostile bytes are what it reads, not TLS records).
func hostileAgent(tb testing.TB, addr string) *Agent {
	a, err := New(Config{RelayURLs: []string{"ws://relay.test"}, Insecure: true, StateDir: tb.TempDir(),
		Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, HeartbeatInterval: time.Second,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}})
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// enrollSeeds are answers a relay (or what stands in front of it) might
// give to an enrollment.
func enrollSeeds(id *identity) []string {
	ok, _ := json.Marshal(frames.EnrollResponse{DeviceID: frames.DeviceID(id.pub[:]), Name: "pi01"})
	other, _ := json.Marshal(frames.EnrollResponse{DeviceID: "d0000000000000000", Name: "pi01"})
	answer := func(status string, headers string, body string) string {
		return fmt.Sprintf("HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s", status, headers, len(body), body)
	}
	return []string{
		answer("200 OK", "Content-Type: application/json\r\n", string(ok)),
		answer("200 OK", "", string(other)),
		answer("200 OK", "", `{"device_id":"`+frames.DeviceID(id.pub[:])+`","name":"-bad name-"}`),
		answer("200 OK", "", `{"device_id":`),
		answer("401 Unauthorized", "", `{"error":"enrollment token is not valid"}`),
		answer("429 Too Many Requests", "Retry-After: 1\r\n", `{"error":"slow down"}`),
		answer("307 Temporary Redirect", "Location: http://thief.test/steal\r\n", ""),
		answer("403 Forbidden", "", "<html>blocked</html>"),
		"HTTP/1.1 403 Forbidden\r\nContent-Length: -1\r\n\r\nhello",
		"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\n" + strings.Repeat("x", maxEnrollAnswer+10),
		"HTTP/1.1 999 Whatever\r\n\r\n",
		"HTTP/1.0 200\r\n\r\n" + string(ok),
		"garbage\r\n\r\n",
		"",
	}
}

// FuzzEnrollAnswer: whatever a hostile relay answers to an enrollment,
// the agent returns an error or an answer about its own key and a valid
// name; only a 4xx JSON refusal from the relay (not 408, 425, 429) is
// final.
func FuzzEnrollAnswer(f *testing.F) {
	srv := newRawServer(f)
	a := hostileAgent(f, srv.ln.Addr().String())
	id, err := loadOrCreateKey(filepath.Join(f.TempDir(), keyFile))
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range enrollSeeds(id) {
		f.Add([]byte(s))
	}
	req := frames.EnrollRequest{Token: "tth_fuzz", EnrollDevice: frames.EnrollDevice{PublicKey: id.pub[:], Name: "pi01"}}
	f.Fuzz(func(t *testing.T, raw []byte) {
		srv.answer.Store(&raw)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := a.enroll(ctx, enrollURL("ws://relay.test"+frames.ConnectPath), req)
		if ctx.Err() != nil {
			t.Fatalf("enrollment hung on %q", raw)
		}
		var refused *EnrollError
		if errors.As(err, &refused) {
			parsed, perr := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), nil)
			if perr != nil || parsed.StatusCode != refused.Status || refused.Status < 400 || refused.Status >= 500 ||
				refused.Status == 408 || refused.Status == 425 || refused.Status == 429 {
				t.Fatalf("final refusal %v from answer %q", refused, raw)
			}
			return
		}
		if err != nil {
			return
		}
		if err := checkEnrollment(resp, id); err == nil {
			if resp.DeviceID != frames.DeviceID(id.pub[:]) || frames.ValidDeviceName(resp.Name) != nil {
				t.Fatalf("accepted %+v", resp)
			}
		}
	})
}

// TestRefusedUpgradeNegativeContentLength is the regression test of a
// relay (here a real local HTTP server) refusing the session's upgrade
// with "Content-Length: -1": the agent gets an error it retries, for the
// session and for enrollment alike, and Run keeps retrying until stopped.
func TestRefusedUpgradeNegativeContentLength(t *testing.T) {
	var hits atomic.Int32
	answers := []string{
		"HTTP/1.1 403 Forbidden\r\nContent-Length: -1\r\n\r\nrefused",
		"HTTP/1.1 426 Upgrade Required\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: -1\r\n\r\n",
		"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n{\"error\":\"no\"}",
	}
	relay := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := hits.Add(1)
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString(answers[int(n-1)%len(answers)])
		brw.Flush()
	}))
	defer relay.Close()
	addr := strings.TrimPrefix(relay.URL, "http://")
	a := hostileAgent(t, addr)
	id, err := loadOrCreateKey(filepath.Join(a.cfg.StateDir, keyFile))
	if err != nil {
		t.Fatal(err)
	}
	for range answers {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		c, err := a.connect(ctx, id, "ws://"+addr+frames.ConnectPath)
		cancel()
		if err == nil {
			c.close()
			t.Fatal("a session over a refused upgrade")
		}
		t.Logf("upgrade refused with Content-Length: -1: %v", err)
	}
	for range answers {
		_, err := a.enroll(t.Context(), "http://"+addr+frames.EnrollPath, frames.EnrollRequest{Token: "tth_x"})
		var refused *EnrollError
		if err == nil || errors.As(err, &refused) {
			t.Fatalf("enrollment answered with Content-Length: -1: %v, want an error to retry", err)
		}
	}
	// Enrolled (the record matches the key): Run dials again and again.
	rec, _ := json.Marshal(&identity{DeviceID: frames.DeviceID(id.pub[:]), Name: "pi01"})
	if err := os.WriteFile(filepath.Join(a.cfg.StateDir, recordFile), rec, 0o600); err != nil {
		t.Fatal(err)
	}
	a.cfg.BackoffMax = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	before := hits.Load()
	deadline := time.After(20 * time.Second)
	for hits.Load() < before+8 {
		select {
		case err := <-done:
			t.Fatalf("Run ended after %d refusals: %v", hits.Load()-before, err)
		case <-deadline:
			t.Fatalf("Run dialled %d times in 20s", hits.Load()-before)
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
}

// handshakeFrames are a relay's side of a valid handshake.
func handshakeFrames(id *identity) (*frames.Challenge, *frames.Welcome, *frames.Leases) {
	return &frames.Challenge{RelayID: "relay-1"},
		&frames.Welcome{DeviceID: frames.DeviceID(id.pub[:]), DeviceName: "pi01", Generation: 1},
		&frames.Leases{Leases: []frames.Lease{{Service: "web", Proto: "http", Hostname: "web-pi01.localhost"}}}
}

// validHandshake is handshakeFrames as bytes.
func validHandshake(id *identity) []byte {
	ch, wel, ls := handshakeFrames(id)
	return frames.Append(frames.Append(frames.Append(nil, ch), wel), ls)
}

// sessionSeeds are control-stream byte sequences a relay might send after
// the agent's hello: the valid handshake and its variations.
func sessionSeeds(id *identity) [][]byte {
	seq := func(ms ...frames.Message) []byte {
		var b []byte
		for _, m := range ms {
			b = frames.Append(b, m)
		}
		return b
	}
	ch, wel, ls := handshakeFrames(id)
	many := &frames.Leases{}
	for i := range 300 {
		many.Leases = append(many.Leases, frames.Lease{Service: fmt.Sprint("s", i), Proto: "tcp", Port: uint16(i)})
	}
	valid := seq(ch, wel, ls, &frames.HeartbeatAck{Seq: 1}, &frames.Leases{}, &frames.Drain{Reason: "restart", WithinMillis: 1000})
	return [][]byte{
		valid,
		seq(ch, wel, ls, &frames.HeartbeatAck{Seq: 1}, &frames.Drain{Reason: "x", WithinMillis: 0xffffffff}),
		seq(ch, wel, ls, &frames.UpdateOffer{Version: "v9.9.9", Manifest: []byte("{}"), Signature: []byte("sig")}),
		seq(ch, wel, ls, &frames.Error{Code: frames.CodeRevoked, Message: "revoked"}),
		seq(ch, wel, many),
		seq(ch, &frames.Welcome{DeviceID: "someone-else"}, ls),
		seq(ch, ch, ch),
		seq(&frames.Error{Code: frames.CodeUnauthorized, Message: "no"}),
		seq(ch, wel, &frames.Leases{}, &frames.StreamAccept{}),
		valid[:len(valid)/2],
		append(seq(ch, wel, ls), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff),
		{0x01},
		{},
	}
}

// FuzzHostileSession: the agent's side of a session against a relay that
// sends data[1:], over a real smux session on loopback TCP, by data[0]%3:
// 0, on the control stream after the agent's hello; 1, raw under smux
// (smux frames of its own making, or garbage); 2, on a data stream it opens
// after a valid handshake (the agent's StreamOpen decoding). The handshake,
// the control loop and the data stream return, with an error or not;
// nothing panics and nothing waits past the deadlines.
func FuzzHostileSession(f *testing.F) {
	a := newHostileSessionAgent(f)
	id, err := loadOrCreateKey(filepath.Join(f.TempDir(), keyFile))
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range sessionSeeds(id) {
		f.Add(append([]byte{0}, s...))
	}
	rawSmux := []byte{1, 0, 0, 0, 3, 0, 0, 0} // smux v1 SYN of stream 3
	f.Add(append([]byte{1}, rawSmux...))
	f.Add(append([]byte{1}, 1, 2, 0xff, 0xff, 1, 0, 0, 0)) // PSH with 64 KiB announced, none sent
	f.Add([]byte{1, 9, 9, 9, 9, 9, 9, 9, 9})
	for _, m := range []frames.Message{&frames.StreamOpen{Service: "web", ClientAddr: "192.0.2.1:1234"},
		&frames.StreamOpen{Service: "nope"}, &frames.StreamOpen{Service: strings.Repeat("w", 5000)}, &frames.Heartbeat{Seq: 1}} {
		f.Add(append([]byte{2}, frames.Append(nil, m)...))
	}
	f.Add([]byte{2, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		mode, payload := data[0]%3, data[1:]
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		relayDone := make(chan struct{})
		c := hostileConn(t, a, func(c net.Conn) {
			defer close(relayDone)
			if c == nil {
				return
			}
			c.SetDeadline(time.Now().Add(8 * time.Second))
			if mode == 2 {
				streamRelay(c, id, payload, a.cfg.Mux.Smux())
				return
			}
			hostileRelay(c, payload, mode == 1, a.cfg.Mux.Smux())
		})
		stop := context.AfterFunc(ctx, c.close)
		if err := c.handshake(ctx, id); err == nil {
			c.serve(ctx)
		}
		stop()
		c.close()
		<-relayDone
		a.wg.Wait()
		if ctx.Err() != nil {
			t.Fatalf("the agent waited past its deadline on %q", data)
		}
	})
}

// newHostileSessionAgent is an agent for FuzzHostileSession: one
// heartbeat a second (the shortest), no relay of its own.
func newHostileSessionAgent(tb testing.TB) *Agent {
	a, err := New(Config{RelayURLs: []string{"wss://relay.test"}, StateDir: tb.TempDir(),
		Services: []Service{{Name: "web", Proto: "http", Addr: "127.0.0.1:1"}}, HeartbeatInterval: time.Second})
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// hostileRelay plays the relay's side of one connection: under smux it
// writes payload raw after the agent's first bytes; otherwise it runs smux,
// reads the agent's hello on its control stream, writes payload there and
// ends its side of the stream. Either way it then reads what the agent sends until the
// agent goes.
func hostileRelay(c net.Conn, payload []byte, underSmux bool, conf *smux.Config) {
	if underSmux {
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		c.Write(payload)
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		return
	}
	s, st, err := acceptHello(c, conf)
	if err != nil {
		return
	}
	defer s.Close()
	st.Write(payload)
	st.CloseWrite() // FIN: the agent reads the end of the stream
	io.Copy(io.Discard, st)
}

// acceptHello runs the relay's side of smux on c and reads the agent's
// hello on its control stream.
func acceptHello(c net.Conn, conf *smux.Config) (*smux.Session, *smux.Stream, error) {
	s, err := smux.Server(c, conf)
	if err != nil {
		return nil, nil, err
	}
	st, err := s.AcceptStream()
	if err == nil {
		_, err = frames.Read(st, 0)
	}
	if err != nil {
		s.Close()
		return nil, nil, err
	}
	return s, st, nil
}

// hostileConn is an agent session with relay, which serves the one
// connection over loopback TCP (nil if none came); the session closes
// when the test ends.
func hostileConn(t *testing.T, a *Agent, relay func(net.Conn)) *conn {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			relay(nil)
			return
		}
		defer c.Close()
		relay(c)
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	mux, err := smux.Client(nc, a.cfg.Mux.Smux())
	if err != nil {
		t.Fatal(err)
	}
	c := &conn{a: a, relay: "hostile", mux: mux}
	t.Cleanup(func() { c.close(); a.wg.Wait() })
	return c
}

// streamRelay plays a relay that completes the handshake, opens a data
// stream to the agent, writes payload on it and ends its side, reads the
// agent's answer, then drains the session.
func streamRelay(c net.Conn, id *identity, payload []byte, conf *smux.Config) (answer []byte) {
	s, ctrl, err := acceptHello(c, conf)
	if err != nil {
		return
	}
	defer s.Close()
	ctrl.Write(validHandshake(id))
	for range 2 { // auth, register
		if _, err := frames.Read(ctrl, 0); err != nil {
			return
		}
	}
	st, err := s.OpenStream()
	if err != nil {
		return
	}
	st.Write(payload)
	st.CloseWrite()
	answer, _ = io.ReadAll(io.LimitReader(st, 1<<20)) // until the agent closes
	st.Close()
	frames.Write(ctrl, &frames.Drain{Reason: "done"})
	ctrl.CloseWrite()
	io.Copy(io.Discard, ctrl)
	return answer
}

// TestHostileSessionSeeds runs the seed corpora's hand-written cases with
// what each must do, beyond not panicking: the valid sequence connects and
// ends on the drain; a welcome for another device, or a relay's error,
// ends the handshake with that error.
func TestHostileSessionSeeds(t *testing.T) {
	id, err := loadOrCreateKey(filepath.Join(t.TempDir(), keyFile))
	if err != nil {
		t.Fatal(err)
	}
	seeds := sessionSeeds(id)
	for _, tc := range []struct {
		name      string
		payload   []byte
		handshake string // "" = succeeds
		serve     string
	}{
		{"valid, then drain", seeds[0], "", "drain"},
		{"revoked after the leases", seeds[3], "", "revoked"},
		{"unauthorized at hello", seeds[7], "refused by the relay", ""},
		{"half a handshake", seeds[9], "EOF", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newHostileSessionAgent(t)
			c := hostileConn(t, a, func(c net.Conn) {
				if c != nil {
					hostileRelay(c, tc.payload, false, a.cfg.Mux.Smux())
				}
			})
			ctx, cancel := context.WithTimeout(t.Context(), 8*time.Second)
			defer cancel()
			err := c.handshake(ctx, id)
			if tc.handshake != "" {
				if err == nil || !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(tc.handshake)) {
					t.Fatalf("handshake: %v, want %q", err, tc.handshake)
				}
				return
			}
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			if err := c.serve(ctx); err == nil || !strings.Contains(strings.ToLower(err.Error()), strings.ToLower(tc.serve)) {
				t.Fatalf("serve: %v, want %q", err, tc.serve)
			}
		})
	}
}

// TestEnrollmentAnswerMustDescribeThisDevice: the agent keeps only an
// enrollment answer about its own key with a valid name; a relay that
// answers with another device's ID, or a bad name, is retried and nothing
// is saved; the right answer is saved.
func TestEnrollmentAnswerMustDescribeThisDevice(t *testing.T) {
	srv := newRawServer(t)
	a := hostileAgent(t, srv.ln.Addr().String())
	a.cfg.EnrollToken, a.cfg.BackoffMax = "tth_x", 20*time.Millisecond
	id, err := loadOrCreateKey(filepath.Join(a.cfg.StateDir, keyFile))
	if err != nil {
		t.Fatal(err)
	}
	seeds := enrollSeeds(id)
	for _, bad := range []string{seeds[1], seeds[2]} { // another device's ID; a bad name
		b := []byte(bad)
		srv.answer.Store(&b)
		before := srv.conns.Load()
		ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		_, err := a.loadIdentity(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || srv.conns.Load() < before+2 {
			t.Fatalf("answer %q: %v after %d attempts, want retries until the deadline", bad, err, srv.conns.Load()-before)
		}
		if _, err := os.Stat(filepath.Join(a.cfg.StateDir, recordFile)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("answer %q was saved", bad)
		}
	}
	good := []byte(seeds[0])
	srv.answer.Store(&good)
	got, err := a.loadIdentity(t.Context())
	if err != nil || got.DeviceID != frames.DeviceID(id.pub[:]) || got.Name != "pi01" {
		t.Fatalf("good answer: %+v %v", got, err)
	}
}

// TestHostileDataStreams: on a data stream a relay opens, the agent
// answers a StreamOpen for an unknown service, or one it cannot reach,
// with the matching refusal, and anything else by closing the stream.
func TestHostileDataStreams(t *testing.T) {
	id, err := loadOrCreateKey(filepath.Join(t.TempDir(), keyFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		payload []byte
		code    frames.ErrorCode // 0: no answer
	}{
		{"unknown service", frames.Append(nil, &frames.StreamOpen{Service: "nope"}), frames.CodeUnknownService},
		{"unreachable service", frames.Append(nil, &frames.StreamOpen{Service: "web"}), frames.CodeDialFailed},
		{"not a stream open", frames.Append(nil, &frames.Heartbeat{Seq: 1}), 0},
		{"oversized", []byte{0xff, 0xff, 0xff, 0xff, 0xff}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newHostileSessionAgent(t)
			answer := make(chan []byte, 1)
			c := hostileConn(t, a, func(c net.Conn) {
				if c == nil {
					answer <- nil
					return
				}
				answer <- streamRelay(c, id, tc.payload, a.cfg.Mux.Smux())
			})
			ctx, cancel := context.WithTimeout(t.Context(), 8*time.Second)
			defer cancel()
			if err := c.handshake(ctx, id); err != nil {
				t.Fatal(err)
			}
			if err := c.serve(ctx); err == nil || !strings.Contains(err.Error(), "drain") {
				t.Fatalf("serve: %v, want the drain", err)
			}
			c.close()
			a.wg.Wait()
			got := <-answer
			if tc.code == 0 {
				if len(got) != 0 {
					t.Fatalf("answered %x", got)
				}
				return
			}
			m, err := frames.Read(bytes.NewReader(got), 0)
			if r, ok := m.(*frames.StreamRefuse); err != nil || !ok || r.Code != tc.code {
				t.Fatalf("answer %#v %v, want a refusal with code %v", m, err, tc.code)
			}
		})
	}
}
