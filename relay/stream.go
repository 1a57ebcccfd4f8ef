package relay

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/xtaci/smux"
)

// errTooManyStreams is returned when the session's stream cap is reached.
var errTooManyStreams = errors.New("too many concurrent connections to this device")

// openStream opens a data stream to a service of the agent and sends its
// header. The agent's answer is read lazily by the returned conn (so the
// first bytes can follow without waiting a round trip) or by awaitAnswer.
func (sess *session) openStream(service, client string) (*streamConn, error) {
	select {
	case sess.streams <- struct{}{}:
	default:
		sess.srv.metrics.streamsRefused.WithLabelValues("cap").Inc()
		return nil, errTooManyStreams
	}
	st, err := sess.mux.OpenStream()
	if err != nil {
		<-sess.streams
		return nil, fmt.Errorf("open stream to %s: %w", sess.name, err)
	}
	if err := frames.WriteTimeout(st, &frames.StreamOpen{Service: service, ClientAddr: client}, writeTimeout); err != nil {
		st.Close()
		<-sess.streams
		return nil, fmt.Errorf("open stream to %s: %w", sess.name, err)
	}
	sess.srv.metrics.streams.Inc()
	return &streamConn{Stream: st, sess: sess, service: service}, nil
}

// streamConn is a data stream whose first inbound frame is the agent's
// accept or refuse answer.
type streamConn struct {
	*smux.Stream
	sess    *session
	service string

	answerOnce sync.Once
	answerErr  error
	closeOnce  sync.Once
}

// RefusedError is a stream the agent refused.
type RefusedError struct {
	Device, Service string
	Refuse          *frames.StreamRefuse
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("device %s refused a connection to service %s: %s", e.Device, e.Service, e.Refuse)
}

// awaitAnswer reads the agent's answer once; it is nil when the agent accepted.
func (c *streamConn) awaitAnswer() error {
	c.answerOnce.Do(func() {
		c.Stream.SetReadDeadline(time.Now().Add(30 * time.Second))
		m, err := frames.Read(c.Stream, 4096)
		c.Stream.SetReadDeadline(time.Time{})
		switch m := m.(type) {
		case *frames.StreamAccept:
		case *frames.StreamRefuse:
			c.sess.srv.metrics.streamsRefused.WithLabelValues("agent").Inc()
			c.answerErr = &RefusedError{Device: c.sess.name, Service: c.service, Refuse: m}
		default:
			if err == nil {
				err = fmt.Errorf("unexpected %v frame", m.Type())
			}
			c.answerErr = fmt.Errorf("stream to %s/%s: no answer: %w", c.sess.name, c.service, err)
		}
	})
	return c.answerErr
}

// passAnswer leaves the agent's answer in the stream for its reader: a
// peer relay that forwards the stream reads it.
func (c *streamConn) passAnswer() { c.answerOnce.Do(func() {}) }

func (c *streamConn) Read(b []byte) (int, error) {
	if err := c.awaitAnswer(); err != nil {
		return 0, err
	}
	return c.Stream.Read(b)
}

// WriteTo keeps io.Copy on the fast path without skipping the answer.
func (c *streamConn) WriteTo(w io.Writer) (int64, error) {
	if err := c.awaitAnswer(); err != nil {
		return 0, err
	}
	return c.Stream.WriteTo(w)
}

func (c *streamConn) Close() error {
	err := c.Stream.Close()
	c.closeOnce.Do(func() { <-c.sess.streams })
	return err
}
