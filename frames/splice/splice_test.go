package splice_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames/splice"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// TestHalfClose: the client sends a request and half-closes; the server
// reads to EOF and only then answers; the answer must arrive whole.
func TestHalfClose(t *testing.T) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done := make(chan splice.Result, 1)
	go func() { done <- splice.Splice(a, b) }()

	req := bytes.Repeat([]byte("q"), 1<<20)
	go func() {
		client.Write(req)
		client.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(got, req) {
		t.Fatalf("server read %d bytes, err %v", len(got), err)
	}
	answer := bytes.Repeat([]byte("a"), 3<<20)
	go func() {
		server.Write(answer)
		server.Close()
	}()
	back, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(back, answer) {
		t.Fatalf("client read %d bytes, err %v", len(back), err)
	}
	r := <-done
	if r.Err != nil || r.AToB != int64(len(req)) || r.BToA != int64(len(answer)) {
		t.Fatalf("result %+v", r)
	}
}

// TestResetEndsBoth: when one side is reset, Splice reports it and closes
// the other side too, without waiting for the client.
func TestResetEndsBoth(t *testing.T) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done := make(chan splice.Result, 1)
	go func() { done <- splice.Splice(a, b) }()
	server.(*net.TCPConn).SetLinger(0)
	server.Close() // RST
	select {
	case r := <-done:
		if r.Err == nil {
			t.Fatal("a reset was not reported")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Splice still running 10s after a reset")
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(client); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the client side was not closed")
	}
}

// TestClosedUnderUs: a connection closed under the splice (an smux stream
// whose session died) ends both directions at once, even while the other
// side is silent: nothing waits on a local service for ever.
func TestClosedUnderUs(t *testing.T) {
	a, aPeer := tcpPair(t)
	b, bPeer := tcpPair(t)
	defer aPeer.Close()
	defer bPeer.Close()
	done := make(chan splice.Result, 1)
	go func() { done <- splice.Splice(a, b) }()
	a.Close() // as smux closes a stream when its session dies
	select {
	case r := <-done:
		if r.Err == nil {
			t.Error("no error reported")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the splice still waits on the silent side")
	}
	bPeer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := bPeer.Read(make([]byte, 1)); err == nil {
		t.Fatal("the other side was not closed")
	}
}
