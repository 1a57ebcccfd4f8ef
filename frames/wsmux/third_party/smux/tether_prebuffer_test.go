//go:debug asynctimerchan=0

// TETHER PATCH: regression tests for the initial receive buffer and the
// untrusted peer (see PATCH.md, 7 and 8). Not part of upstream smux.

package smux

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"testing/synctest"
)

// countingConn counts the bytes its reader took from the connection.
type countingConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestInitialReceiveBuffer: a server session started with a small
// receive buffer stops reading from a peer that pushes data nobody reads
// once that buffer (and the frame being read) is full; GrowReceiveBuffer
// lets the rest through, and nothing is lost.
func TestInitialReceiveBuffer(t *testing.T) {
	for _, v := range []int{1, 2} {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const initial, push = 16 << 10, 1 << 20
				cfg := DefaultConfig()
				cfg.Version, cfg.KeepAliveDisabled = v, true
				cfg.MaxReceiveBuffer, cfg.MaxStreamBuffer = 4<<20, 512<<10
				cfg.MaxFrameSize = initial // an untrusted peer's frames fit the buffer (patch 8)
				scfg := *cfg
				scfg.InitialReceiveBuffer = initial
				a, b := net.Pipe()
				counted := &countingConn{Conn: a}
				server, err := Server(counted, &scfg)
				if err != nil {
					t.Fatal(err)
				}
				defer server.Close()
				client, err := Client(b, cfg)
				if err != nil {
					t.Fatal(err)
				}
				defer client.Close()
				st, err := client.OpenStream()
				if err != nil {
					t.Fatal(err)
				}
				data := bytes.Repeat([]byte("tether"), push/6+1)[:push]
				go func() {
					st.Write(data)
					st.Close()
				}()
				synctest.Wait() // every goroutine blocked: the server stopped reading
				limit := int64(initial + cfg.MaxFrameSize + 2*headerSize)
				if n := counted.n.Load(); n > limit {
					t.Fatalf("the server read %d bytes from an unread stream, want at most %d", n, limit)
				}
				server.GrowReceiveBuffer(cfg.MaxReceiveBuffer - initial)
				got, err := server.AcceptStream()
				if err != nil {
					t.Fatal(err)
				}
				defer got.Close()
				all, err := io.ReadAll(got)
				if err != nil || !bytes.Equal(all, data) {
					t.Fatalf("read %d of %d bytes after growing the buffer: %v", len(all), len(data), err)
				}
			})
		})
	}
}

// TestUntrustedPeer: until GrowReceiveBuffer, a peer that opens a second
// stream or sends a frame longer than the initial buffer ends the session
// with ErrUntrustedPeer; one stream of small frames is served, and after
// GrowReceiveBuffer both are allowed.
func TestUntrustedPeer(t *testing.T) {
	const initial = 4 << 10
	for _, v := range []int{1, 2} {
		for _, tc := range []struct {
			name        string
			trusted     bool
			streams     int
			frame, data int
			wantErr     error
		}{
			{"one stream, small frames", false, 1, initial, 64 << 10, nil},
			{"a second stream", false, 2, initial, 1, ErrUntrustedPeer},
			{"a long frame", false, 1, initial + 1, initial + 1, ErrUntrustedPeer},
			{"trusted: streams and long frames", true, 3, 32 << 10, 64 << 10, nil},
		} {
			t.Run(fmt.Sprintf("v%d/%s", v, tc.name), func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					cfg := DefaultConfig()
					cfg.Version, cfg.KeepAliveDisabled = v, true
					cfg.MaxReceiveBuffer, cfg.MaxStreamBuffer = 4<<20, 512<<10
					scfg := *cfg
					scfg.InitialReceiveBuffer = initial
					cfg.MaxFrameSize = tc.frame
					a, b := net.Pipe()
					server, err := Server(a, &scfg)
					if err != nil {
						t.Fatal(err)
					}
					defer server.Close()
					if tc.trusted {
						server.GrowReceiveBuffer(scfg.MaxReceiveBuffer - initial)
					}
					client, err := Client(b, cfg)
					if err != nil {
						t.Fatal(err)
					}
					defer client.Close()
					data := bytes.Repeat([]byte("x"), tc.data)
					for i := 0; i < tc.streams; i++ {
						st, err := client.OpenStream()
						if err != nil {
							t.Fatal(err)
						}
						go func() {
							st.Write(data)
							st.Close()
						}()
					}
					// The error may come on an accept or a read, whichever
					// the offending frame reaches first.
					for i := 0; i < tc.streams; i++ {
						got, err := server.AcceptStream()
						if err != nil {
							if tc.wantErr != nil && errors.Is(err, tc.wantErr) {
								return
							}
							t.Fatalf("accept stream %d: %v", i, err)
						}
						defer got.Close()
						all, err := io.ReadAll(got)
						if tc.wantErr != nil && errors.Is(err, tc.wantErr) {
							return
						}
						if err != nil && err != io.EOF || len(all) != tc.data {
							t.Fatalf("stream %d: read %d of %d bytes: %v", i, len(all), tc.data, err)
						}
					}
					if tc.wantErr != nil {
						t.Fatalf("the untrusted peer was served; want %v", tc.wantErr)
					}
				})
			})
		}
	}
}
