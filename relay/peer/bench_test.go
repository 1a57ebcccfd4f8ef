package peer_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/peer/peertest"
)

// BenchmarkForward measures the throughput of one stream through a peer
// session (relay-a to relay-b: TLS 1.3 and smux over loopback TCP) against
// a direct loopback TCP copy of the same bytes, in the same run. Each op
// sends 64 MiB one way over a new stream, then over a new TCP connection,
// each to a sink that counts them. Reported: peer-MB/s, direct-MB/s and
// their ratio peer/direct.
func BenchmarkForward(b *testing.B) {
	const size = 64 << 20
	ca := peertest.NewCA(b)
	sink := func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
		frames.Write(st, &frames.StreamAccept{})
		countBack(st)
	}
	a := startRelay(b, ca, "relay-a", "127.0.0.1:0", holder())
	r := startRelay(b, ca, "relay-b", "127.0.0.2:0", sink)
	direct := directSink(b)
	if st, err := a.open(b.Context(), r, "dev-b"); err != nil { // dial the session
		b.Fatal(err)
	} else if err := send(st, size, true); err != nil {
		b.Fatal(err)
	}

	var peerTime, directTime time.Duration
	ops := 0
	for b.Loop() {
		start := time.Now()
		st, err := a.open(b.Context(), r, "dev-b")
		if err != nil {
			b.Fatal(err)
		}
		if err := send(st, size, true); err != nil {
			b.Fatal(err)
		}
		peerTime += time.Since(start)

		start = time.Now()
		c, err := net.Dial("tcp", direct)
		if err != nil {
			b.Fatal(err)
		}
		if err := send(c, size, false); err != nil {
			b.Fatal(err)
		}
		directTime += time.Since(start)
		ops++
	}
	mbps := func(d time.Duration) float64 { return float64(size) * float64(ops) / d.Seconds() / 1e6 }
	b.ReportMetric(mbps(peerTime), "peer-MB/s")
	b.ReportMetric(mbps(directTime), "direct-MB/s")
	b.ReportMetric(directTime.Seconds()/peerTime.Seconds(), "peer/direct")
}

var benchBuf = make([]byte, 32<<10)

// send writes n bytes on c, half-closes it and checks the sink's count
// (after its stream-accept when answered).
func send(c net.Conn, n int, answered bool) error {
	defer c.Close()
	for left := n; left > 0; left -= len(benchBuf) {
		if _, err := c.Write(benchBuf[:min(left, len(benchBuf))]); err != nil {
			return err
		}
	}
	if err := c.(closeWriter).CloseWrite(); err != nil {
		return err
	}
	if answered {
		if err := answer(c); err != nil {
			return err
		}
	}
	var count [8]byte
	if _, err := io.ReadFull(c, count[:]); err != nil {
		return err
	}
	if got := binary.BigEndian.Uint64(count[:]); got != uint64(n) {
		return io.ErrShortWrite
	}
	return nil
}

// countBack reads c to its end and answers the byte count.
func countBack(c net.Conn) {
	buf := make([]byte, 32<<10)
	n, _ := io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, buf)
	c.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
}

// directSink serves countBack on loopback TCP until the benchmark ends.
func directSink(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer c.Close(); countBack(c) })
		}
	})
	return ln.Addr().String()
}
