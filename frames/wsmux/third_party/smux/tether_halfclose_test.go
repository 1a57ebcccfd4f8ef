// TETHER PATCH: regression tests for the half-close data loss (see PATCH.md).
// This file is not part of upstream smux.

package smux

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// halfCloseReply is what the server end writes after the client's FIN:
// 1 MiB, 32 frames of the default MaxFrameSize.
const halfCloseReply = 1 << 20

// halfClosePayload returns n bytes whose content depends on seed, so that a
// reply delivered to the wrong stream, reordered or truncated is detected.
func halfClosePayload(seed, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(seed*131 + i*7 + i>>11)
	}
	return b
}

// halfCloseConfig returns the config of both ends for protocol version v.
// For v2 the stream window holds the whole reply, so the server can finish
// writing while the client has not read yet; v1 only has the session-wide
// MaxReceiveBuffer (4 MiB), which holds it already.
func halfCloseConfig(v int) *Config {
	c := DefaultConfig()
	c.Version = v
	if v == 2 {
		c.MaxStreamBuffer = 2 * halfCloseReply
	}
	if err := VerifyConfig(c); err != nil {
		panic(err)
	}
	return c
}

// loopbackSessions returns a client and a server session joined by a real
// TCP connection on 127.0.0.1. Both are closed when the test ends.
func loopbackSessions(t *testing.T, config *Config) (client, server *Session) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	accepted := make(chan net.Conn, 1)
	acceptErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			acceptErr <- err
			return
		}
		accepted <- c
	}()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	var sc net.Conn
	select {
	case sc = <-accepted:
	case err := <-acceptErr:
		cc.Close()
		t.Fatal(err)
	}

	client, err = Client(cc, config)
	if err != nil {
		t.Fatal(err)
	}
	server, err = Server(sc, config)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// requestFormat is the client's request: fixed width, so that a server can
// read it without waiting for the client's FIN.
const requestFormat = "request %04d"

// serveHalfClose answers n streams on sess the way a TCP server answers a
// client that sent its request and then shutdown(SHUT_WR): it reads the
// request up to EOF (untilEOF) or just the request's bytes, writes the reply
// and closes the stream (FIN).
func serveHalfClose(sess *Session, n int, untilEOF bool) <-chan error {
	errs := make(chan error, n)
	go func() {
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			st, err := sess.AcceptStream()
			if err != nil {
				errs <- fmt.Errorf("accept: %w", err)
				continue
			}
			wg.Add(1)
			go func(st *Stream) {
				defer wg.Done()
				errs <- answerHalfClose(st, untilEOF)
			}(st)
		}
		wg.Wait()
		close(errs)
	}()
	return errs
}

func answerHalfClose(st *Stream, untilEOF bool) error {
	defer st.Close()
	var req []byte
	var err error
	if untilEOF {
		req, err = io.ReadAll(st)
	} else {
		req = make([]byte, len(fmt.Sprintf(requestFormat, 0)))
		_, err = io.ReadFull(st, req)
	}
	if err != nil {
		return fmt.Errorf("stream %d: server read: %w", st.ID(), err)
	}
	var seed int
	if _, err := fmt.Sscanf(string(req), requestFormat, &seed); err != nil {
		return fmt.Errorf("stream %d: server got %q: %w", st.ID(), req, err)
	}
	if _, err := st.Write(halfClosePayload(seed, halfCloseReply)); err != nil {
		return fmt.Errorf("stream %d: server write: %w", st.ID(), err)
	}
	return nil
}

// checkReply compares a reply with the payload for seed.
func checkReply(seed int, got []byte) error {
	want := halfClosePayload(seed, halfCloseReply)
	if len(got) != len(want) {
		return fmt.Errorf("request %d: got %d bytes before EOF, want %d (%d lost)",
			seed, len(got), len(want), len(want)-len(got))
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("request %d: reply corrupted", seed)
	}
	return nil
}

// checkSessionIdle checks that no stream is left registered and that every
// receive token went back to the session's bucket.
func checkSessionIdle(t *testing.T, sess *Session) {
	t.Helper()
	if n := sess.NumStreams(); n != 0 {
		t.Errorf("%d streams still registered after Close", n)
	}
	if got, want := atomic.LoadInt32(&sess.bucket), int32(sess.config.MaxReceiveBuffer); got != want {
		t.Errorf("session bucket = %d tokens, want %d", got, want)
	}
}

// TestHalfCloseUnreadDataSurvivesBothFINs is the deterministic
// reproduction. The client lets the whole reply and both FINs go through
// before it reads past the reply's first byte, then reads the rest. Upstream
// v1.5.57 discards the buffered reply in the cleanup that runs once both
// sides have sent FIN, and the next Read returns EOF. The cleanup runs in
// one of two places, depending on which FIN comes last:
//
//   - peerFINLast: the client sends its request and CloseWrite; the server
//     reads up to EOF, replies and closes. The cleanup runs in the client's
//     recvLoop (fin) when the server's FIN arrives; the client waits for it
//     on GetDieCh.
//   - localFINLast: the server reads the request, replies and closes; the
//     client waits until the server's FIN has arrived, then calls
//     CloseWrite, which runs the cleanup.
func TestHalfCloseUnreadDataSurvivesBothFINs(t *testing.T) {
	for _, v := range []int{1, 2} {
		for _, peerFINLast := range []bool{true, false} {
			name := fmt.Sprintf("v%d/localFINLast", v)
			if peerFINLast {
				name = fmt.Sprintf("v%d/peerFINLast", v)
			}
			t.Run(name, func(t *testing.T) {
				halfCloseInOrder(t, v, peerFINLast)
			})
		}
	}
}

func halfCloseInOrder(t *testing.T, v int, peerFINLast bool) {
	const streams = 4
	client, server := loopbackSessions(t, halfCloseConfig(v))
	serverErrs := serveHalfClose(server, streams, peerFINLast)

	wait := func(seed int, ch <-chan struct{}, what string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(30 * time.Second):
			t.Fatalf("request %d: %s", seed, what)
		}
	}
	for seed := 0; seed < streams; seed++ {
		st, err := client.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fmt.Fprintf(st, requestFormat, seed); err != nil {
			t.Fatal(err)
		}
		if peerFINLast {
			if err := st.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}
		// One byte first: in v2 the first Read announces the stream
		// window; without it the server stops after 256 KiB.
		first := make([]byte, 1)
		if _, err := io.ReadFull(st, first); err != nil {
			t.Fatalf("request %d: client read: %v", seed, err)
		}
		if !peerFINLast {
			wait(seed, st.chFinEvent, "the server's FIN did not arrive")
			if err := st.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}
		// Both FINs are through: die is closed, the reply is buffered.
		wait(seed, st.GetDieCh(), "the stream did not see both FINs")
		rest, err := io.ReadAll(st)
		if err != nil {
			t.Fatalf("request %d: client read: %v", seed, err)
		}
		if err := checkReply(seed, append(first, rest...)); err != nil {
			t.Error(err)
		}
		st.Close()
	}
	for err := range serverErrs {
		if err != nil {
			t.Error(err)
		}
	}
	checkSessionIdle(t, client)
}

// TestHalfCloseConcurrentReaders is the flow of a spliced TCP connection
// (httputil's switchProtocolCopier, tether's stream copy): many streams at
// once, each reading its reply while it arrives, as io.Copy would. Every
// byte must arrive before EOF, and Read must end with io.EOF, not an error.
func TestHalfCloseConcurrentReaders(t *testing.T) {
	for _, v := range []int{1, 2} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			const streams = 8
			client, server := loopbackSessions(t, halfCloseConfig(v))
			serverErrs := serveHalfClose(server, streams, true)

			clientErrs := make(chan error, streams)
			var wg sync.WaitGroup
			for seed := 0; seed < streams; seed++ {
				wg.Add(1)
				go func(seed int) {
					defer wg.Done()
					clientErrs <- requestHalfClose(client, seed)
				}(seed)
			}
			wg.Wait()
			close(clientErrs)
			for err := range clientErrs {
				if err != nil {
					t.Error(err)
				}
			}
			for err := range serverErrs {
				if err != nil {
					t.Error(err)
				}
			}
			checkSessionIdle(t, client)
		})
	}
}

func requestHalfClose(sess *Session, seed int) error {
	st, err := sess.OpenStream()
	if err != nil {
		return err
	}
	defer st.Close()
	if _, err := fmt.Fprintf(st, requestFormat, seed); err != nil {
		return err
	}
	if err := st.CloseWrite(); err != nil {
		return err
	}
	// A small buffer: many Reads, each of which may block in waitRead
	// while the last frames and the FIN arrive.
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := st.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("request %d: client read after %d bytes: %w", seed, got.Len(), err)
		}
	}
	return checkReply(seed, got.Bytes())
}

// TestHalfCloseWaitReadAfterBothFINs pins the read side of the cleanup:
// once both sides have sent FIN, die is closed as well as chFinEvent, and a
// reader that then waits must be told to read (data is buffered) or EOF,
// never io.ErrClosedPipe. select picks among ready cases at random, so the
// wait is repeated.
func TestHalfCloseWaitReadAfterBothFINs(t *testing.T) {
	s := newUnitTestStream()
	data := []byte("last bytes of the reply")
	s.pushBytes(&data)
	close(s.chWriteClosed) // as CloseWrite does
	s.fin()                // the peer's FIN: runs the half-close cleanup

	select {
	case <-s.die:
	default:
		t.Fatal("die not closed after both FINs")
	}
	for i := 0; i < 64; i++ {
		if err := s.waitRead(); err != nil {
			t.Fatalf("wait %d with %d bytes buffered: %v", i, s.bufferRing.len(), err)
		}
	}
	buf := make([]byte, 64)
	n, err := s.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], data) {
		t.Fatalf("Read = %q, %v; want %q, nil", buf[:n], err, data)
	}
	for i := 0; i < 64; i++ {
		if err := s.waitRead(); err != io.EOF {
			t.Fatalf("wait %d with empty buffer: %v, want io.EOF", i, err)
		}
	}
	if n, err := s.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read after the data = %d, %v; want 0, io.EOF", n, err)
	}
}
