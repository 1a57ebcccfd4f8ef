// Package peertest issues the certificates of a test cluster: a root,
// peer certificates for relay IDs, and the certificates a relay must refuse
// as a peer (from another root, under an intermediate, a CA, wrong names or
// usages).
//
// Certificates are valid from an hour before they are made: in a
// testing/synctest bubble, whose clock starts in 2000, make them inside the
// bubble.
package peertest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/tetherfleet/tether/relay/peer"
)

// CA is a test certificate authority: a root, or an intermediate under one.
type CA struct {
	Cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	chain [][]byte // Cert and its issuers up to the root, root excluded
}

// NewCA makes a root CA.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := template("Tether test cluster root")
	tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	cert := create(t, tmpl, tmpl, key, key)
	return &CA{Cert: cert, key: key}
}

// Pool returns a pool holding only this CA, as Config.Roots.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Leaf describes a certificate to issue.
type Leaf struct {
	DNSNames []string
	// ExtKeyUsage; nil means server and client authentication.
	ExtKeyUsage []x509.ExtKeyUsage
}

// Peer issues the peer certificate of relay id: DNS name peer.DNSName(id),
// server and client authentication.
func (ca *CA) Peer(t testing.TB, id string) tls.Certificate {
	t.Helper()
	return ca.Issue(t, Leaf{DNSNames: []string{peer.DNSName(id)}})
}

// Issue issues a leaf; the returned chain holds the intermediates up to
// the root, not the root.
func (ca *CA) Issue(t testing.TB, l Leaf) tls.Certificate {
	t.Helper()
	key := newKey(t)
	tmpl := template(l.DNSNames[0])
	tmpl.DNSNames = l.DNSNames
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = l.ExtKeyUsage
	if tmpl.ExtKeyUsage == nil {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	cert := create(t, tmpl, ca.Cert, key, ca.key)
	return tls.Certificate{Certificate: append([][]byte{cert.Raw}, ca.chain...), PrivateKey: key, Leaf: cert}
}

// Intermediate issues a CA under this one, as the control plane issues a
// relay's CA for its public names. dnsNames, if any, go into the CA's own
// certificate (for a CA that tries to pass as a peer: see Self).
func (ca *CA) Intermediate(t testing.TB, dnsNames ...string) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := template("Tether test relay CA")
	tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	tmpl.DNSNames = dnsNames
	cert := create(t, tmpl, ca.Cert, key, ca.key)
	return &CA{Cert: cert, key: key, chain: append([][]byte{cert.Raw}, ca.chain...)}
}

// Self returns the CA's own certificate (with its issuers but the root)
// and key as a TLS certificate.
func (ca *CA) Self() tls.Certificate {
	chain := ca.chain
	if len(chain) == 0 { // a root
		chain = [][]byte{ca.Cert.Raw}
	}
	return tls.Certificate{Certificate: chain, PrivateKey: ca.key, Leaf: ca.Cert}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func template(cn string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
}

func create(t testing.TB, tmpl, parent *x509.Certificate, key, signer *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
