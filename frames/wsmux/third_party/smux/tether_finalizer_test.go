// TETHER PATCH: regression test for accepted streams closed by the garbage
// collector while in use (see PATCH.md, 6). Not part of upstream smux.

package smux

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"
)

// TestAcceptedStreamSurvivesGC keeps only the *stream inside an accepted
// Stream, as a caller does during `st.Write(...)` or `io.Copy(w, st)` when
// nothing uses st afterwards, or with `defer st.Close()` (which saves
// st.stream). It then collects the garbage and waits for the finalizers
// that collection queued. The stream must still be open: the request the
// client sent before must be readable, and the reply written after it must
// reach the client whole. Upstream's AcceptStream set a finalizer on the
// wrapper that closed the stream: the request was dropped, the reply never
// sent, and under load a FIN could go out between two frames of a reply.
func TestAcceptedStreamSurvivesGC(t *testing.T) {
	for _, v := range []int{1, 2} {
		v := v
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Version = v
			client, server := loopbackSessions(t, cfg)
			const request, reply = 4 << 10, 64 << 10
			deadline := time.Now().Add(10 * time.Second)

			cst, err := client.OpenStream()
			if err != nil {
				t.Fatal(err)
			}
			cst.SetDeadline(deadline)
			if _, err := cst.Write(halfClosePayload(1, request)); err != nil {
				t.Fatal(err)
			}
			server.SetDeadline(deadline)
			inner, err := acceptInner(server)
			if err != nil {
				t.Fatal(err)
			}
			if err := runQueuedFinalizers(10 * time.Second); err != nil {
				t.Fatal(err)
			}
			select {
			case <-inner.die:
				t.Error("the garbage collector closed an accepted stream in use")
			default:
			}

			served := make(chan error, 1)
			go func() {
				inner.SetDeadline(deadline)
				got := make([]byte, request)
				if _, err := io.ReadFull(inner, got); err != nil {
					served <- fmt.Errorf("server: read request: %w", err)
					return
				}
				if !bytes.Equal(got, halfClosePayload(1, request)) {
					served <- errors.New("server: request corrupted")
					return
				}
				if _, err := inner.Write(halfClosePayload(2, reply)); err != nil {
					served <- fmt.Errorf("server: write reply: %w", err)
					return
				}
				served <- inner.Close()
			}()

			got, err := io.ReadAll(cst)
			if err != nil || !bytes.Equal(got, halfClosePayload(2, reply)) {
				t.Errorf("client: read %d of %d reply bytes (intact: %v): %v",
					len(got), reply, bytes.Equal(got, halfClosePayload(2, reply)), err)
				client.Close() // unblocks the server's goroutine
				server.Close()
			}
			if err := <-served; err != nil {
				t.Error(err)
			}
			cst.Close()
		})
	}
}

// acceptInner accepts a stream and returns only its *stream: the Stream
// wrapper is garbage once it returns.
//
//go:noinline
func acceptInner(sess *Session) (*stream, error) {
	st, err := sess.AcceptStream()
	if err != nil {
		return nil, err
	}
	return st.stream, nil
}

// runQueuedFinalizers collects the garbage and waits until the finalizers
// of what that collection found unreachable have run. runtime.GC queues
// them before it returns; the single goroutine that runs finalizers takes
// the queue in batches, one after another. A sentinel queued later has
// either been taken in the same batch (then the next sentinel, queued after
// it ran, comes in a later batch) or in a later one, so when the second
// sentinel has run, the first collection's finalizers are through.
func runQueuedFinalizers(timeout time.Duration) error {
	runtime.GC()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for i := 0; i < 2; i++ {
		ran := make(chan struct{})
		// 64 bytes: finalizers of tiny (< 16 bytes, no pointers)
		// allocations may never run.
		sentinel := new([64]byte)
		runtime.SetFinalizer(sentinel, func(*[64]byte) { close(ran) })
		runtime.GC()
		select {
		case <-ran:
		case <-deadline.C:
			return errors.New("finalizers did not run")
		}
	}
	return nil
}
