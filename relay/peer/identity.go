package peer

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
)

// Protocol is the ALPN protocol of peer connections: a peer that does not
// offer it is refused in the TLS handshake, before smux starts.
//
// Version history (never reuse, only append):
//   - tether-peer.v1: first version (TLS 1.3 with certificates both ways,
//     stream-accept, smux v2 with keepalive, streams starting with
//     peer-open).
const Protocol = "tether-peer.v1"

// nameSuffix ends the DNS name of every peer certificate. The .invalid
// top-level domain never resolves, so the name cannot be a public one.
const nameSuffix = ".relay.tether.invalid"

// DNSName returns the DNS name (SAN) that a peer certificate of relay id
// carries: "<id>.relay.tether.invalid".
func DNSName(id string) string { return id + nameSuffix }

// validRelayID checks that id makes a DNS name: dot-separated labels of 1
// to 63 letters, digits and inner hyphens.
func validRelayID(id string) error {
	if id == "" || len(DNSName(id)) > 253 {
		return fmt.Errorf("relay ID %q: empty or too long", id)
	}
	for label := range strings.SplitSeq(id, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("relay ID %q: not a DNS name", id)
		}
		for i := 0; i < len(label); i++ {
			c := label[i] | 0x20 // lower case; leaves digits and '-' alone
			if (c < 'a' || c > 'z') && (label[i] < '0' || label[i] > '9') && label[i] != '-' {
				return fmt.Errorf("relay ID %q: not a DNS name", id)
			}
		}
	}
	return nil
}

// identity returns the relay ID proved by verified chains: a leaf signed
// by a root directly (chain of two), not a CA, for both server and client
// authentication (whichever side it is on), with exactly one relay name.
func identity(chains [][]*x509.Certificate) (string, error) {
	var leaf *x509.Certificate
	for _, ch := range chains {
		if len(ch) == 2 {
			leaf = ch[0]
			break
		}
	}
	switch {
	case leaf == nil:
		return "", fmt.Errorf("%w: certificate not signed by the cluster root itself", ErrIdentity)
	case leaf.IsCA:
		return "", fmt.Errorf("%w: a CA certificate", ErrIdentity)
	case !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth):
		return "", fmt.Errorf("%w: certificate not for both server and client authentication", ErrIdentity)
	}
	id := ""
	for _, name := range leaf.DNSNames {
		if len(name) <= len(nameSuffix) || !strings.EqualFold(name[len(name)-len(nameSuffix):], nameSuffix) {
			continue
		}
		if id != "" {
			return "", fmt.Errorf("%w: certificate names several relays", ErrIdentity)
		}
		id = name[:len(name)-len(nameSuffix)]
	}
	if validRelayID(id) != nil {
		return "", fmt.Errorf("%w: certificate names no relay", ErrIdentity)
	}
	return id, nil
}

// verifiedPeer checks a completed handshake (certificates already verified
// against the roots by crypto/tls) and returns the peer's relay ID.
func verifiedPeer(cs tls.ConnectionState) (string, error) {
	if cs.NegotiatedProtocol != Protocol {
		return "", fmt.Errorf("peer does not speak %s", Protocol)
	}
	return identity(cs.VerifiedChains)
}

// serverTLS accepts peers whose certificate, for client authentication,
// proves a relay identity.
func (t *Transport) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{t.cfg.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    t.cfg.Roots,
		NextProtos:   []string{Protocol},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := verifiedPeer(cs)
			return err
		},
	}
}

// clientTLS accepts only relay id, whose certificate is for server
// authentication. It always sends this relay's certificate, so a peer
// that does not trust it says so in the handshake.
func (t *Transport) clientTLS(id string) *tls.Config {
	cert := t.cfg.Cert
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		RootCAs:              t.cfg.Roots,
		ServerName:           DNSName(id),
		NextProtos:           []string{Protocol},
		VerifyConnection: func(cs tls.ConnectionState) error {
			got, err := verifiedPeer(cs)
			if err == nil && !strings.EqualFold(got, id) {
				err = fmt.Errorf("%w: the peer is relay %q, not %q", ErrIdentity, got, id)
			}
			return err
		},
	}
}

// checkOwnCert checks at startup that cert is a peer identity of relay id
// under roots, for both directions, as the peers will check it.
func checkOwnCert(cert tls.Certificate, roots *x509.CertPool, id string) error {
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return err
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return err
		}
		inter.AddCert(c)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
		if err != nil {
			return err
		}
		got, err := identity(chains)
		if err != nil {
			return err
		}
		if !strings.EqualFold(got, id) {
			return fmt.Errorf("%w: it names relay %q, not %q", ErrIdentity, got, id)
		}
	}
	return nil
}
