// TETHER PATCH: regression test for data lost between OpenStream's SYN and
// the stream's registration (see PATCH.md, 5). Not part of upstream smux.

package smux

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// TestOpenStreamAnsweredAtOnce opens many streams whose peer writes the
// moment it accepts them. Every byte must reach the opener: before the
// patch, a reply read by recvLoop before OpenStream registered the stream
// was dropped and the opener waited for ever (here: until its deadline).
func TestOpenStreamAnsweredAtOnce(t *testing.T) {
	for _, v := range []int{1, 2} {
		v := v
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Version = v
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			const reply = 64 << 10
			var wg sync.WaitGroup
			defer func() { ln.Close(); wg.Wait() }()
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						s, err := Server(c, cfg)
						if err != nil {
							return
						}
						defer s.Close()
						for {
							st, err := s.AcceptStream()
							if err != nil {
								return
							}
							wg.Add(1)
							go func() {
								defer wg.Done()
								defer st.Close()
								st.Write(make([]byte, reply)) // at once, before the opener reads
							}()
						}
					}()
				}
			}()
			for round := 0; round < 20; round++ {
				if err := openAndRead(ln.Addr().String(), cfg, 20, reply); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
			}
		})
	}
}

// openAndRead opens n streams on a new session, one after another, and
// reads each to its end. The session is closed on return, which also ends
// the peer's writers when a reply was lost.
func openAndRead(addr string, cfg *Config, n, reply int) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	s, err := Client(c, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	for i := 0; i < n; i++ {
		st, err := s.OpenStream()
		if err != nil {
			return err
		}
		st.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.Copy(io.Discard, st)
		st.Close()
		if err != nil && !errors.Is(err, io.EOF) || got != int64(reply) {
			return fmt.Errorf("stream %d: read %d of %d bytes: %v", i, got, reply, err)
		}
	}
	return nil
}
