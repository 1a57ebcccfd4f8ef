// Package splice copies bytes both ways between two connections, passing
// each side's end of stream on as a half-close, as a tunnel must.
package splice

import (
	"errors"
	"io"
	"net"
	"sync"
)

// closeWriter is a connection whose write half can be closed alone
// (*net.TCPConn, *tls.Conn, smux streams).
type closeWriter interface{ CloseWrite() error }

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// Result says how a splice ended.
type Result struct {
	AToB, BToA int64 // bytes copied each way
	Err        error // the first failure other than a normal end of stream
}

// Splice copies a→b and b→a until both directions have ended, then closes
// both. When one direction reaches end of stream, the destination's write
// half is closed (CloseWrite) so the peer sees EOF while the other direction
// goes on. When one direction fails, both connections are closed at once.
func Splice(a, b net.Conn) Result {
	var r Result
	errs := make(chan error, 2)
	go func() { n, err := copyHalf(b, a); r.AToB = n; errs <- err }()
	go func() { n, err := copyHalf(a, b); r.BToA = n; errs <- err }()
	for range 2 {
		if err := <-errs; err != nil && r.Err == nil {
			r.Err = err
			a.Close() // unblock the other direction
			b.Close()
		}
	}
	a.Close()
	b.Close()
	return r
}

// copyHalf copies src to dst, then half-closes dst.
func copyHalf(dst, src net.Conn) (int64, error) {
	buf := bufPool.Get().(*[]byte)
	defer bufPool.Put(buf)
	n, err := io.CopyBuffer(dst, src, *buf)
	if err != nil && !errors.Is(err, io.EOF) {
		// Not the peer's end of stream: a connection closed under us (an
		// smux stream whose session died reads io.ErrClosedPipe) or
		// failed. End both, so that nothing waits on the other side for
		// ever (a local service that answers only minutes later).
		return n, err
	}
	if cw, ok := dst.(closeWriter); ok {
		cw.CloseWrite()
		return n, nil
	}
	return n, errNoHalfClose // the peer cannot see EOF otherwise: end both
}

var errNoHalfClose = errors.New("splice: destination cannot half-close")
