//go:debug asynctimerchan=0

// TETHER PATCH: regression test for the initial receive buffer (see
// PATCH.md, 7). Not part of upstream smux.

package smux

import (
	"bytes"
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
