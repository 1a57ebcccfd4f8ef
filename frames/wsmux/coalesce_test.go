package wsmux

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"testing"
)

// recorder is the connection under a frameWriter: it keeps every write.
type recorder struct {
	io.ReadWriteCloser
	writes [][]byte
}

func (r *recorder) Write(p []byte) (int, error) {
	r.writes = append(r.writes, bytes.Clone(p))
	return len(p), nil
}

// wsFrame encodes one client frame header (masked or not) and payload.
func wsFrame(payload []byte, masked bool) []byte {
	b := []byte{0x82, 0}
	switch n := len(payload); {
	case n < 126:
		b[1] = byte(n)
	case n <= 0xffff:
		b[1] = 126
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b[1] = 127
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	if masked {
		b[1] |= 0x80
		b = append(b, 1, 2, 3, 4)
	}
	return append(b, payload...)
}

// checkCoalesced feeds frames to a frameWriter in the pieces cut says and
// checks the bytes pass unchanged, each write ends on a frame boundary
// (or is a maxCoalesce piece of a large frame), and nothing stays buffered.
func checkCoalesced(t *testing.T, frames [][]byte, cut func(int) int) {
	t.Helper()
	var in []byte
	ends := map[int]bool{0: true}
	for _, f := range frames {
		in = append(in, f...)
		ends[len(in)] = true
	}
	rec := &recorder{}
	w := &frameWriter{ReadWriteCloser: rec}
	for p := in; len(p) > 0; {
		k := max(1, min(cut(len(p)), len(p)))
		if n, err := w.Write(p[:k]); n != k || err != nil {
			t.Fatalf("Write: %d, %v", n, err)
		}
		p = p[k:]
	}
	if got := bytes.Join(rec.writes, nil); !bytes.Equal(got, in) {
		t.Fatalf("bytes changed: %d written, %d in", len(got), len(in))
	}
	if len(w.buf) != 0 {
		t.Fatalf("%d bytes left buffered after the last frame", len(w.buf))
	}
	off := 0
	for i, wr := range rec.writes {
		off += len(wr)
		if !ends[off] && len(wr) < maxCoalesce {
			t.Fatalf("write %d (%d bytes) ends inside a frame at %d", i, len(wr), off)
		}
	}
}

func TestFrameWriterCoalescesFrames(t *testing.T) {
	sizes := []int{0, 1, 125, 126, 4096, 32 << 10, 0xffff, 0x10000, 200 << 10}
	var frames [][]byte
	for i, n := range sizes {
		frames = append(frames, wsFrame(bytes.Repeat([]byte{byte(i)}, n), i%2 == 0))
	}
	t.Run("4KiB pieces, as coder/websocket writes", func(t *testing.T) {
		checkCoalesced(t, frames, func(int) int { return 4096 })
	})
	t.Run("byte by byte", func(t *testing.T) {
		checkCoalesced(t, frames[:6], func(int) int { return 1 })
	})
	t.Run("all at once", func(t *testing.T) {
		checkCoalesced(t, frames, func(n int) int { return n })
	})
	rec := &recorder{}
	w := &frameWriter{ReadWriteCloser: rec}
	f := wsFrame(make([]byte, 32<<10), true)
	for p := f; len(p) > 0; p = p[min(4096, len(p)):] {
		w.Write(p[:min(4096, len(p))])
	}
	if len(rec.writes) != 1 {
		t.Fatalf("a 32 KiB frame written in 4 KiB pieces reached the connection in %d writes, want 1", len(rec.writes))
	}
}

func FuzzFrameWriter(f *testing.F) {
	f.Add(uint64(1), []byte{0, 125, 126, 200})
	f.Add(uint64(7), []byte{3, 3, 3})
	f.Fuzz(func(t *testing.T, seed uint64, lens []byte) {
		rng := rand.New(rand.NewPCG(seed, seed))
		var frames [][]byte
		for _, l := range lens[:min(len(lens), 32)] {
			n := int(l) * (1 + rng.IntN(600)) // up to ~150 KiB, every length class
			frames = append(frames, wsFrame(make([]byte, n), rng.IntN(2) == 0))
		}
		checkCoalesced(t, frames, func(int) int { return 1 + rng.IntN(9000) })
	})
}
