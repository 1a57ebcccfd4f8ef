package wsmux

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// This file is the client half of RFC 6455 (WebSocket), just what the agent
// needs: the upgrade handshake and binary messages, each Write one masked
// frame. It avoids net/http, which would add about a megabyte to the agent
// (see cross's size budgets); the relay accepts with coder/websocket.

// wsGUID is the RFC 6455 handshake constant.
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// WebSocket opcodes.
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xA
)

// dialConn opens a TCP connection to u's host, through the HTTPS_PROXY of
// the environment when one applies (CONNECT), then TLS for wss/https.
func dialConn(ctx context.Context, u *url.URL, o DialOptions) (net.Conn, error) {
	host := u.Host
	if u.Port() == "" {
		port := "443"
		if u.Scheme == "ws" || u.Scheme == "http" {
			port = "80"
		}
		host = net.JoinHostPort(u.Hostname(), port)
	}
	dial := o.DialContext
	if dial == nil {
		dial = (&net.Dialer{KeepAlive: -1}).DialContext // the heartbeat is the liveness check
	}
	var conn net.Conn
	var err error
	if proxy := proxyFor(u); proxy != nil {
		conn, err = dialViaProxy(ctx, dial, proxy, host)
	} else {
		conn, err = dial(ctx, "tcp", host)
	}
	if err != nil {
		return nil, err
	}
	if u.Scheme == "ws" || u.Scheme == "http" {
		return conn, nil
	}
	conf := &tls.Config{}
	if o.TLS != nil {
		conf = o.TLS.Clone()
	}
	if conf.ServerName == "" {
		conf.ServerName = u.Hostname()
	}
	conf.NextProtos = []string{"http/1.1"}
	tc := tls.Client(conn, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", host, err)
	}
	return tc, nil
}

// proxyFor returns the proxy from HTTPS_PROXY (or HTTP_PROXY for ws://)
// unless NO_PROXY excludes the host.
func proxyFor(u *url.URL) *url.URL {
	get := func(k string) string {
		if v := os.Getenv(k); v != "" {
			return v
		}
		return os.Getenv(strings.ToLower(k))
	}
	raw := get("HTTPS_PROXY")
	if u.Scheme == "ws" || u.Scheme == "http" {
		raw = get("HTTP_PROXY")
	}
	if raw == "" {
		return nil
	}
	for _, np := range strings.Split(get("NO_PROXY"), ",") {
		np = strings.TrimPrefix(strings.TrimSpace(np), ".")
		h := u.Hostname()
		if np == "*" || np != "" && (h == np || strings.HasSuffix(h, "."+np)) {
			return nil
		}
	}
	p, err := url.Parse(raw)
	if err != nil || p.Host == "" {
		return nil
	}
	return p
}

func dialViaProxy(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), proxy *url.URL, target string) (net.Conn, error) {
	addr := proxy.Host
	if proxy.Port() == "" {
		addr = net.JoinHostPort(proxy.Hostname(), "80")
	}
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial proxy %s: %w", addr, err)
	}
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if proxy.User != nil {
		pw, _ := proxy.User.Password()
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(proxy.User.Username()+":"+pw)) + "\r\n"
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := io.WriteString(conn, req+"\r\n"); err != nil {
		conn.Close()
		return nil, fmt.Errorf("proxy CONNECT: %w", err)
	}
	br := bufio.NewReader(conn)
	status, _, err := readResponseHead(br)
	if err == nil && status != 200 {
		err = fmt.Errorf("proxy answered %d", status)
	}
	if err == nil && br.Buffered() > 0 {
		err = errors.New("proxy sent bytes before the tunnel was up")
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("proxy CONNECT to %s: %w", target, err)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

// header is a response header with canonical (lower-case) keys.
type header map[string]string

// Get returns the value of key (any case).
func (h header) Get(key string) string { return h[strings.ToLower(key)] }

// readResponseHead reads an HTTP/1.1 status line and header (at most 100
// lines), without net/textproto.
func readResponseHead(br *bufio.Reader) (int, header, error) {
	line, err := readLine(br)
	if err != nil {
		return 0, nil, fmt.Errorf("read status line: %w", err)
	}
	proto, rest, ok := strings.Cut(line, " ")
	code, _, _ := strings.Cut(rest, " ")
	status, err := strconv.Atoi(code)
	if !ok || !strings.HasPrefix(proto, "HTTP/1.") || err != nil {
		return 0, nil, fmt.Errorf("malformed status line %q", line)
	}
	h := header{}
	for range 100 {
		line, err := readLine(br)
		if err != nil {
			return 0, nil, fmt.Errorf("read header: %w", err)
		}
		if line == "" {
			return status, h, nil
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			return 0, nil, fmt.Errorf("malformed header line %q", line)
		}
		h[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
	}
	return 0, nil, errors.New("too many header lines")
}

// readLine reads one CRLF- or LF-terminated line of at most 8 KiB.
func readLine(br *bufio.Reader) (string, error) {
	var b []byte
	for {
		chunk, more, err := br.ReadLine()
		if err != nil {
			return "", err
		}
		b = append(b, chunk...)
		if len(b) > 8<<10 {
			return "", errors.New("line too long")
		}
		if !more {
			return string(b), nil
		}
	}
}

// HandshakeError is a refused WebSocket upgrade.
type HandshakeError struct {
	Status int    // HTTP status of the answer
	Body   string // the start of the answer's body
}

func (e *HandshakeError) Error() string {
	return fmt.Sprintf("websocket upgrade refused: HTTP %d: %s", e.Status, strings.TrimSpace(e.Body))
}

// dialWebSocket performs the upgrade handshake on a fresh connection.
func dialWebSocket(ctx context.Context, rawURL string, o DialOptions) (*wsConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "wss" && u.Scheme != "ws" {
		return nil, fmt.Errorf("url %q: want wss:// or ws://", rawURL)
	}
	conn, err := dialConn(ctx, u, o)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	var nonce [16]byte
	rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n",
		u.RequestURI(), u.Host, key, subprotocol)
	for k, vs := range o.Header {
		for _, v := range vs {
			fmt.Fprintf(&req, "%s: %s\r\n", k, v)
		}
	}
	req.WriteString("\r\n")
	if _, err := conn.Write(req.Bytes()); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send upgrade request: %w", err)
	}
	br := bufio.NewReaderSize(conn, 4<<10) // larger reads bypass it
	status, h, err := readResponseHead(br)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("read upgrade answer: %w", err)
	}
	if status != 101 {
		// Keep the start of the body for the error; the relay keeps the
		// connection open, so read no more than it announced.
		n := br.Buffered()
		if cl, err := strconv.Atoi(h.Get("Content-Length")); err == nil {
			n = cl
		}
		body := make([]byte, min(n, 512))
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		k, _ := io.ReadFull(br, body)
		conn.Close()
		return nil, &HandshakeError{Status: status, Body: string(body[:k])}
	}
	sum := sha1.Sum([]byte(key + wsGUID))
	switch {
	case !strings.EqualFold(h.Get("Upgrade"), "websocket"):
		err = errors.New("answer lacks Upgrade: websocket")
	case h.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]):
		err = errors.New("bad Sec-WebSocket-Accept")
	case h.Get("Sec-WebSocket-Protocol") != subprotocol:
		err = fmt.Errorf("relay chose subprotocol %q: %w", h.Get("Sec-WebSocket-Protocol"), ErrProtocol)
	case h.Get("Sec-WebSocket-Extensions") != "":
		err = errors.New("relay negotiated an extension that was not offered")
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("websocket upgrade: %w", err)
	}
	conn.SetDeadline(time.Time{})
	return &wsConn{Conn: conn, br: br}, nil
}

// wsConn is a client WebSocket as a net.Conn of binary messages: each
// Write is one masked frame; Read returns message bytes as they arrive.
// Pings are answered and a close frame ends the stream (io.EOF).
type wsConn struct {
	net.Conn
	br *bufio.Reader

	rmu       sync.Mutex
	remaining uint64 // payload bytes left in the current data frame
	rerr      error

	wmu    sync.Mutex
	closed bool
}

// maxControl is the largest control frame payload (RFC 6455 5.5).
const maxControl = 125

func (c *wsConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for c.remaining == 0 {
		if c.rerr != nil {
			return 0, c.rerr
		}
		if err := c.nextFrame(); err != nil {
			c.rerr = err
			return 0, err
		}
	}
	if uint64(len(p)) > c.remaining {
		p = p[:c.remaining]
	}
	n, err := c.br.Read(p)
	c.remaining -= uint64(n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// nextFrame reads frame headers, serving control frames, until a data
// frame with a payload begins.
func (c *wsConn) nextFrame() error {
	var h [14]byte
	if _, err := io.ReadFull(c.br, h[:2]); err != nil {
		return err
	}
	fin, op := h[0]&0x80 != 0, h[0]&0x0f
	if h[0]&0x70 != 0 {
		return c.fail(1002, "reserved bits set")
	}
	if h[1]&0x80 != 0 {
		return c.fail(1002, "masked frame from server")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		if _, err := io.ReadFull(c.br, h[2:4]); err != nil {
			return err
		}
		n = uint64(binary.BigEndian.Uint16(h[2:4]))
	case 127:
		if _, err := io.ReadFull(c.br, h[2:10]); err != nil {
			return err
		}
		n = binary.BigEndian.Uint64(h[2:10])
	}
	switch op {
	case opBinary, opContinuation:
		c.remaining = n
		return nil
	case opText:
		return c.fail(1003, "text message on a binary tunnel")
	case opPing, opPong, opClose:
		if n > maxControl || !fin {
			return c.fail(1002, "bad control frame")
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.br, payload); err != nil {
			return err
		}
		switch op {
		case opPing:
			c.writeFrame(opPong, payload)
		case opClose:
			c.writeFrame(opClose, payload[:min(2, len(payload))])
			c.Conn.Close()
			return io.EOF
		}
		return nil
	}
	return c.fail(1002, fmt.Sprintf("unknown opcode %d", op))
}

// fail sends a close frame with code and reason and reports the violation.
func (c *wsConn) fail(code uint16, reason string) error {
	c.writeFrame(opClose, binary.BigEndian.AppendUint16(nil, code))
	c.Conn.Close()
	return fmt.Errorf("websocket: %s", reason)
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.writeFrame(opBinary, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteBuffers writes the buffers as one message. smux uses it for each
// frame (header, payload), which spares it a 64 KB buffer per session.
func (c *wsConn) WriteBuffers(v [][]byte) (int, error) {
	if err := c.writeFrame(opBinary, v...); err != nil {
		return 0, err
	}
	n := 0
	for _, b := range v {
		n += len(b)
	}
	return n, nil
}

// framePool holds frame buffers shared by all connections, so an idle
// connection keeps none.
var framePool = sync.Pool{New: func() any { return new([]byte) }}

// writeFrame writes one masked frame, the concatenation of ps, with a
// single write to the conn.
func (c *wsConn) writeFrame(op byte, ps ...[]byte) error {
	size := 0
	for _, p := range ps {
		size += len(p)
	}
	bp := framePool.Get().(*[]byte)
	defer framePool.Put(bp)
	b := append((*bp)[:0], 0x80|op)
	switch {
	case size < 126:
		b = append(b, 0x80|byte(size))
	case size <= 0xffff:
		b = append(b, 0x80|126)
		b = binary.BigEndian.AppendUint16(b, uint16(size))
	default:
		b = append(b, 0x80|127)
		b = binary.BigEndian.AppendUint64(b, uint64(size))
	}
	var key [4]byte
	rand.Read(key[:])
	b = append(b, key[:]...)
	start := len(b)
	for _, p := range ps {
		b = append(b, p...)
	}
	mask(b[start:], key)
	*bp = b
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	_, err := c.Conn.Write(b)
	return err
}

// mask XORs b with the repeating key, eight bytes at a time.
func mask(b []byte, key [4]byte) {
	k := uint64(binary.LittleEndian.Uint32(key[:]))
	k |= k << 32
	i := 0
	for ; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], binary.LittleEndian.Uint64(b[i:])^k)
	}
	for ; i < len(b); i++ {
		b[i] ^= key[i&3]
	}
}

// Close sends a normal close frame and closes the connection.
func (c *wsConn) Close() error {
	c.writeFrame(opClose, binary.BigEndian.AppendUint16(nil, 1000))
	c.wmu.Lock()
	c.closed = true
	c.wmu.Unlock()
	return c.Conn.Close()
}

// Post sends one HTTP/1.1 POST of a JSON body to url (https://…), over the
// same dial path as sessions (proxy, TLS roots), and returns the status and
// up to 64 KiB of the answer's body.
func Post(ctx context.Context, rawURL string, body []byte, o DialOptions) (int, []byte, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return 0, nil, err
	}
	conn, err := dialConn(ctx, u, o)
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
		u.RequestURI(), u.Host, len(body))
	if _, err := conn.Write(append([]byte(req), body...)); err != nil {
		return 0, nil, fmt.Errorf("send request: %w", err)
	}
	br := bufio.NewReader(conn)
	status, h, err := readResponseHead(br)
	if err != nil {
		return 0, nil, err
	}
	r := io.LimitReader(br, 64<<10)
	if cl, err := strconv.Atoi(h.Get("Content-Length")); err == nil && h.Get("Transfer-Encoding") == "" {
		r = io.LimitReader(br, int64(min(cl, 64<<10)))
	} else if strings.EqualFold(h.Get("Transfer-Encoding"), "chunked") {
		r = io.LimitReader(newChunkedReader(br), 64<<10)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return status, data, fmt.Errorf("read answer: %w", err)
	}
	return status, data, nil
}

// chunkedReader decodes a chunked body (RFC 9112 7.1); trailers are ignored.
type chunkedReader struct {
	br   *bufio.Reader
	left int64
	done bool
}

func newChunkedReader(br *bufio.Reader) *chunkedReader { return &chunkedReader{br: br} }

func (c *chunkedReader) Read(p []byte) (int, error) {
	for c.left == 0 {
		if c.done {
			return 0, io.EOF
		}
		line, err := c.br.ReadString('\n')
		if err != nil {
			return 0, err
		}
		size, _, _ := strings.Cut(strings.TrimSpace(line), ";")
		n, err := strconv.ParseInt(size, 16, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("bad chunk size %q", line)
		}
		if n == 0 {
			c.done = true
			return 0, io.EOF
		}
		c.left = n
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.br.Read(p)
	c.left -= int64(n)
	if c.left == 0 && err == nil {
		_, err = c.br.Discard(2) // CRLF after the chunk
	}
	return n, err
}
