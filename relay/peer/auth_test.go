package peer_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/wsmux"
	"github.com/tetherfleet/tether/relay/peer"
	"github.com/tetherfleet/tether/relay/peer/peertest"
	"github.com/tetherfleet/tether/relay/relaytest"
	"github.com/xtaci/smux"
)

// rawHandshake runs a dialler's side of the peer handshake on c by hand
// (not with package peer): TLS presenting cert and expecting relay id
// under roots, offering alpn, then the peer's stream-accept.
func rawHandshake(c net.Conn, cert tls.Certificate, roots *x509.CertPool, id string, alpn ...string) (*tls.Conn, error) {
	tc := tls.Client(c, &tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: peer.DNSName(id), NextProtos: alpn,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	})
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		tc.Close()
		return nil, err
	}
	if _, err := frames.ReadAs[*frames.StreamAccept](tc, 0); err != nil {
		tc.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return tc, nil
}

// dialRaw connects to a peer's listener at addr by hand and starts an
// smux client session on it, closed when the test ends.
func dialRaw(t testing.TB, addr string, cert tls.Certificate, roots *x509.CertPool, id string) *smux.Session {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := rawHandshake(c, cert, roots, id, peer.Protocol)
	if err != nil {
		t.Fatal(err)
	}
	return smuxClient(t, tc)
}

// smuxClient starts an smux client session on c with the agents' settings
// (no keepalive), closed when the test ends.
func smuxClient(t testing.TB, c net.Conn) *smux.Session {
	t.Helper()
	sess, err := smux.Client(c, wsmux.Config{}.Smux())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	return sess
}

// badCerts are certificates that must not pass as relay relay-x's peer
// identity under ca, with what else must not either.
type badCert struct {
	name string
	cert tls.Certificate
	alpn string // offered protocol; "" means peer.Protocol, "-" none
}

func badCerts(t testing.TB, ca *peertest.CA) []badCert {
	x := peer.DNSName("relay-x")
	return []badCert{
		{name: "another root", cert: peertest.NewCA(t).Peer(t, "relay-x")},
		{name: "leaf of an intermediate of the root", cert: ca.Intermediate(t).Peer(t, "relay-x")},
		{name: "an intermediate of the root itself", cert: ca.Intermediate(t, x).Self()},
		{name: "the root itself", cert: ca.Self()},
		{name: "no relay name", cert: ca.Issue(t, peertest.Leaf{DNSNames: []string{"relay-x.example.com"}})},
		{name: "two relay names", cert: ca.Issue(t, peertest.Leaf{DNSNames: []string{x, peer.DNSName("relay-y")}})},
		{name: "server authentication only", cert: ca.Issue(t, peertest.Leaf{DNSNames: []string{x}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})},
		{name: "client authentication only", cert: ca.Issue(t, peertest.Leaf{DNSNames: []string{x}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})},
		{name: "no certificate", cert: tls.Certificate{}},
		{name: "good certificate, no ALPN", cert: ca.Peer(t, "relay-x"), alpn: "-"},
		{name: "good certificate, another protocol", cert: ca.Peer(t, "relay-x"), alpn: "tether-peer.v0"},
	}
}

func (b badCert) protocols() []string {
	switch b.alpn {
	case "":
		return []string{peer.Protocol}
	case "-":
		return nil
	}
	return []string{b.alpn}
}

// TestAcceptRefusesNonPeers: the accepting relay refuses, in the handshake,
// a dialler that is not a relay of the cluster by its own root, or does not
// speak the protocol: the dialler learns it before any stream, the refusal
// is counted and the handler never runs. A real peer gets in.
func TestAcceptRefusesNonPeers(t *testing.T) {
	ca := peertest.NewCA(t)
	var served atomic.Int32
	b := startRelay(t, ca, "relay-b", "127.0.0.2:0", func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
		served.Add(1)
		holder("dev-b")(ctx, open, st)
	})
	for i, c := range badCerts(t, ca) {
		t.Run(c.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", b.addr)
			if err != nil {
				t.Fatal(err)
			}
			tc, err := rawHandshake(conn, c.cert, ca.Pool(), "relay-b", c.protocols()...)
			if err == nil {
				tc.Close()
				t.Fatal("accepted as a peer")
			}
			t.Logf("dialler's error: %v", err)
			relaytest.Eventually(t, 5*time.Second, func() error {
				if n := b.metric(t, "tether_relay_peer_handshake_errors_total"); n != float64(i+1) {
					return fmt.Errorf("%v handshake errors counted, want %d", n, i+1)
				}
				return nil
			})
		})
	}
	sess := dialRaw(t, b.addr, ca.Peer(t, "relay-x"), ca.Pool(), "relay-b")
	st, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	frames.Write(st, &frames.PeerOpen{DeviceID: "dev-b", Service: "echo", ClientAddr: "203.0.113.7:40000"})
	if got, err := exchange(st, []byte("a real peer")); err != nil || string(got) != "a real peer" {
		t.Fatalf("a real peer: %q, %v", got, err)
	}
	if n := served.Load(); n != 1 {
		t.Errorf("the handler ran %d times, want once (for the real peer)", n)
	}
	if n := b.metric(t, "tether_relay_peer_sessions", "direction=in"); n != 1 {
		t.Errorf("%v sessions in, want 1", n)
	}
}

// fakePeer listens on 127.0.0.3 and runs the accepting side of the
// handshake by hand with cert, offering alpn: a relay that should not be
// trusted. It holds each connection until the test ends.
func fakePeer(t testing.TB, cert tls.Certificate, alpn []string) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.3:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequireAnyClientCert, NextProtos: alpn})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				if c.(*tls.Conn).Handshake() == nil {
					frames.Write(c, &frames.StreamAccept{})
				}
			})
		}
	})
	return ln.Addr().String()
}

// TestDiallerRefusesNonPeers: Open refuses, in the handshake, a listener
// that is not relay-x of the cluster (relay-x's certificate under the
// wrong root or an intermediate, a CA, another relay, the wrong usage or
// protocol); the error says why and the failed dial is counted.
func TestDiallerRefusesNonPeers(t *testing.T) {
	ca := peertest.NewCA(t)
	a := startRelay(t, ca, "relay-a", "127.0.0.1:0", holder())
	var hostname x509.HostnameError
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	type check func(error) bool
	is := func(target error) check { return func(err error) bool { return errors.Is(err, target) } }
	as := func(target any) check { return func(err error) bool { return errors.As(err, target) } }
	says := func(s string) check { return func(err error) bool { return strings.Contains(err.Error(), s) } }
	x := peer.DNSName("relay-x")
	cases := []struct {
		name string
		cert tls.Certificate
		alpn []string
		want check
	}{
		{"another root", peertest.NewCA(t).Peer(t, "relay-x"), nil, as(&unknown)},
		{"leaf of an intermediate of the root", ca.Intermediate(t).Peer(t, "relay-x"), nil, is(peer.ErrIdentity)},
		{"an intermediate of the root itself", ca.Intermediate(t, x).Self(), nil, is(peer.ErrIdentity)},
		{"another relay", ca.Peer(t, "relay-y"), nil, as(&hostname)},
		{"two relay names", ca.Issue(t, peertest.Leaf{DNSNames: []string{x, peer.DNSName("relay-y")}}), nil, is(peer.ErrIdentity)},
		{"client authentication only", ca.Issue(t, peertest.Leaf{DNSNames: []string{x}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}), nil, as(&invalid)},
		{"no protocol", ca.Peer(t, "relay-x"), []string{}, says("does not speak " + peer.Protocol)},
		{"another protocol", ca.Peer(t, "relay-x"), []string{"h2"}, says("no application protocol")},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			alpn := c.alpn
			if alpn == nil {
				alpn = []string{peer.Protocol}
			}
			addr := fakePeer(t, c.cert, alpn)
			_, err := a.tr.Open(t.Context(), "relay-x", addr, &frames.PeerOpen{DeviceID: "dev-x", Service: "echo"})
			if err == nil || !c.want(err) {
				t.Fatalf("Open: %v", err)
			}
			t.Logf("Open: %v", err)
			if n := a.metric(t, "tether_relay_peer_dial_errors_total"); n != float64(i+1) {
				t.Errorf("%v dial errors counted, want %d", n, i+1)
			}
			a.tr.Forget("relay-x") // no back-off for the next case
		})
	}
}

// TestNewChecksOwnCertificate: New refuses a certificate its peers would
// refuse, or one of another relay, and incomplete settings.
func TestNewChecksOwnCertificate(t *testing.T) {
	ca := peertest.NewCA(t)
	for _, c := range badCerts(t, ca) {
		if c.alpn != "" {
			continue // a protocol matter, not a certificate one
		}
		t.Run(c.name, func(t *testing.T) {
			if _, err := peer.New(peer.Config{RelayID: "relay-x", Cert: c.cert, Roots: ca.Pool()}); err == nil {
				t.Fatal("New accepted it")
			}
		})
	}
	good := ca.Peer(t, "relay-x")
	for name, cfg := range map[string]peer.Config{
		"another relay's certificate": {RelayID: "relay-a", Cert: good, Roots: ca.Pool()},
		"no roots":                    {RelayID: "relay-x", Cert: good},
		"no relay ID":                 {Cert: good, Roots: ca.Pool()},
		"relay ID not a DNS name":     {RelayID: "relay x", Cert: good, Roots: ca.Pool()},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := peer.New(cfg); err == nil {
				t.Fatal("New accepted it")
			}
		})
	}
	tr, err := peer.New(peer.Config{RelayID: "relay-x", Cert: good, Roots: ca.Pool()})
	if err != nil {
		t.Fatalf("a good certificate: %v", err)
	}
	tr.Close()
}
