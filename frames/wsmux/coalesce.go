package wsmux

import (
	"encoding/binary"
	"io"
	"net/http"
	"sync"
)

// The agent's WebSocket client (coder/websocket) masks each message
// through a 4 KiB bufio.Writer, so a 32 KiB smux frame reaches TLS as
// eight 4 KiB writes: eight TLS records and eight syscalls, which cost the
// agent and the relay about a third of device-to-user throughput. The
// client writes whole WebSocket frames and flushes at the end of each, so
// a writer that knows where each frame ends can hand TLS one write per
// frame instead. frameWriter is that writer; coalescingTransport puts it
// under the upgraded connection, above whatever the transport dialled
// (direct or through a proxy).

// coalescingTransport wraps the body of a 101 answer in a frameWriter.
type coalescingTransport struct{ http.RoundTripper }

func (t coalescingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.RoundTripper.RoundTrip(r)
	if err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
		if rwc, ok := resp.Body.(io.ReadWriteCloser); ok {
			resp.Body = &frameWriter{ReadWriteCloser: rwc}
		}
	}
	return resp, err
}

// maxCoalesce bounds the bytes a frameWriter holds: a larger frame goes
// out in pieces of this size.
const maxCoalesce = 64 << 10

// frameWriter buffers the client's WebSocket frames (RFC 6455 5.2) and
// writes each complete frame, or maxCoalesce bytes, with one Write. It
// parses only the lengths in the frames' headers, which the client itself
// wrote.
type frameWriter struct {
	io.ReadWriteCloser

	mu   sync.Mutex
	buf  []byte
	hdr  [14]byte // the current frame's header so far
	nhdr int      // bytes of hdr seen
	need int      // header bytes the current frame has (0: not known yet)
	left uint64   // payload bytes of the current frame still to come
}

func (w *frameWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		if w.left == 0 || w.need == 0 || w.nhdr < w.need {
			p = w.header(p)
		} else {
			k := int(min(w.left, uint64(len(p)), uint64(maxCoalesce-len(w.buf))))
			w.buf = append(w.buf, p[:k]...)
			w.left -= uint64(k)
			p = p[k:]
		}
		if w.atBoundary() || len(w.buf) >= maxCoalesce {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

// header consumes header bytes of the current frame from p.
func (w *frameWriter) header(p []byte) []byte {
	for len(p) > 0 && (w.need == 0 || w.nhdr < w.need) {
		w.hdr[w.nhdr] = p[0]
		w.buf = append(w.buf, p[0])
		w.nhdr++
		p = p[1:]
		if w.nhdr == 2 {
			w.need = 2
			if w.hdr[1]&0x80 != 0 { // masked
				w.need += 4
			}
			switch w.hdr[1] & 0x7f {
			case 126:
				w.need += 2
			case 127:
				w.need += 8
			}
		}
	}
	if w.need != 0 && w.nhdr == w.need {
		switch l := w.hdr[1] & 0x7f; l {
		case 126:
			w.left = uint64(binary.BigEndian.Uint16(w.hdr[2:]))
		case 127:
			w.left = binary.BigEndian.Uint64(w.hdr[2:])
		default:
			w.left = uint64(l)
		}
		if w.left == 0 {
			w.nhdr, w.need = 0, 0 // an empty frame is complete
		}
	}
	return p
}

// atBoundary reports whether the buffer ends with a complete frame.
func (w *frameWriter) atBoundary() bool {
	if w.need != 0 && w.nhdr == w.need && w.left == 0 {
		w.nhdr, w.need = 0, 0 // the frame's payload is complete
	}
	return w.nhdr == 0 && len(w.buf) > 0
}

func (w *frameWriter) flush() error {
	_, err := w.ReadWriteCloser.Write(w.buf)
	w.buf = w.buf[:0]
	return err
}
