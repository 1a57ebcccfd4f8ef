package clusterca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/relay/devca"
)

func mustCA(t *testing.T) *CA {
	t.Helper()
	ca, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func ecKey(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return k, der
}

func issue(t *testing.T, ca *CA, req controlplane.CertRequest) *x509.Certificate {
	t.Helper()
	resp, err := ca.Issue(req)
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Root) != string(ca.Cert.Raw) {
		t.Fatal("response carries another root")
	}
	c, err := x509.ParseCertificate(resp.Cert)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// leafUnder issues a certificate for hosts under parent (the relay's
// intermediate), with the given usages.
func leafUnder(t *testing.T, parent *x509.Certificate, key crypto.Signer, hosts []string, usage ...x509.ExtKeyUsage) []byte {
	t.Helper()
	lk, _ := ecKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: hosts[0]},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &lk.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestLoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	ca, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "ca-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi.Mode(), err)
	}
	again, err := LoadOrCreate(dir)
	if err != nil || !again.Cert.Equal(ca.Cert) || again.Path != filepath.Join(dir, "ca.pem") {
		t.Fatalf("reload: %v", err)
	}
	if !ca.Cert.IsCA || ca.Cert.MaxPathLen != 1 {
		t.Fatalf("root: CA %v, MaxPathLen %d", ca.Cert.IsCA, ca.Cert.MaxPathLen)
	}
	os.Remove(filepath.Join(dir, "ca-key.pem"))
	if _, err := LoadOrCreate(dir); err == nil {
		t.Fatal("a root without its key was accepted (or replaced)")
	}
}

func TestPeerCertificate(t *testing.T) {
	ca := mustCA(t)
	_, der := ecKey(t)
	c := issue(t, ca, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertPeer, PublicKey: der})
	if c.IsCA || len(c.DNSNames) != 1 || c.DNSNames[0] != "relay-a.relay.tether.invalid" {
		t.Fatalf("peer cert: CA %v names %v", c.IsCA, c.DNSNames)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		id, err := VerifyPeer(ca.Cert, [][]byte{c.Raw}, usage)
		if err != nil || id != "relay-a" {
			t.Fatalf("verify peer for %v: %q %v", usage, id, err)
		}
	}
	// Another CA's peer certificate is refused.
	other := mustCA(t)
	foreign := issue(t, other, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertPeer, PublicKey: der})
	if _, err := VerifyPeer(ca.Cert, [][]byte{foreign.Raw}, x509.ExtKeyUsageClientAuth); err == nil {
		t.Fatal("a peer certificate of another CA verified")
	}
	// Ed25519 keys are fine for peers.
	pub, _, _ := ed25519.GenerateKey(nil)
	edDER, _ := x509.MarshalPKIXPublicKey(pub)
	issue(t, ca, controlplane.CertRequest{RelayID: "relay-b", Kind: controlplane.CertPeer, PublicKey: edDER})
}

func TestIntermediateIsNameConstrained(t *testing.T) {
	ca := mustCA(t)
	key, der := ecKey(t)
	inter := issue(t, ca, controlplane.CertRequest{RelayID: "relay-a", Kind: controlplane.CertIntermediate, PublicKey: der,
		Hosts: []string{"tether.example.com", "relay-a.example.net", "192.0.2.10", "2001:db8::1"}})
	if !inter.IsCA || !inter.MaxPathLenZero || !inter.PermittedDNSDomainsCritical {
		t.Fatalf("intermediate: CA %v pathlen0 %v critical %v", inter.IsCA, inter.MaxPathLenZero, inter.PermittedDNSDomainsCritical)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	inters := x509.NewCertPool()
	inters.AddCert(inter)
	verify := func(der []byte, name string, usage x509.ExtKeyUsage) error {
		leaf, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, DNSName: name, KeyUsages: []x509.ExtKeyUsage{usage}})
		return err
	}
	server := x509.ExtKeyUsageServerAuth
	for _, ok := range []string{"web-pi01.tether.example.com", "tether.example.com", "relay-a.example.net"} {
		if err := verify(leafUnder(t, inter, key, []string{ok}, server), ok, server); err != nil {
			t.Errorf("permitted name %s: %v", ok, err)
		}
	}
	if err := verify(leafUnder(t, inter, key, []string{"192.0.2.10"}, server), "192.0.2.10", server); err != nil {
		t.Errorf("permitted IP: %v", err)
	}
	for _, bad := range []string{"bank.example.org", "example.com", "relay-b.relay.tether.invalid", "192.0.2.11"} {
		if err := verify(leafUnder(t, inter, key, []string{bad}, server), bad, server); err == nil {
			t.Errorf("name %s outside the constraints verified", bad)
		}
	}
	// The intermediate cannot mint a peer certificate: not the name, not
	// the client usage, not a chain longer than root → leaf.
	peer := leafUnder(t, inter, key, []string{"relay-b.relay.tether.invalid"}, server, x509.ExtKeyUsageClientAuth)
	if _, err := VerifyPeer(ca.Cert, [][]byte{peer, inter.Raw}, x509.ExtKeyUsageClientAuth); err == nil {
		t.Fatal("a peer certificate minted by a relay's intermediate verified")
	}
	client := leafUnder(t, inter, key, []string{"relay-a.example.net"}, x509.ExtKeyUsageClientAuth)
	if err := verify(client, "relay-a.example.net", x509.ExtKeyUsageClientAuth); err == nil {
		t.Fatal("a client certificate under the intermediate verified")
	}
}

func TestRequestsValidated(t *testing.T) {
	ca := mustCA(t)
	ca.Domains = []string{"tether.example.com"}
	_, der := ecKey(t)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rsaDER, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	many := make([]string, MaxHosts+1)
	for i := range many {
		many[i] = "h.tether.example.com"
	}
	for name, req := range map[string]controlplane.CertRequest{
		"relay ID with a dot":     {RelayID: "a.b", Kind: controlplane.CertPeer, PublicKey: der},
		"relay ID with wildcard":  {RelayID: "*", Kind: controlplane.CertPeer, PublicKey: der},
		"empty relay ID":          {Kind: controlplane.CertPeer, PublicKey: der},
		"RSA key":                 {RelayID: "a", Kind: controlplane.CertPeer, PublicKey: rsaDER},
		"garbage key":             {RelayID: "a", Kind: controlplane.CertPeer, PublicKey: []byte("nope")},
		"unknown kind":            {RelayID: "a", Kind: "root", PublicKey: der},
		"peer with hosts":         {RelayID: "a", Kind: controlplane.CertPeer, PublicKey: der, Hosts: []string{"x.tether.example.com"}},
		"intermediate, no hosts":  {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der},
		"too many hosts":          {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: many},
		"wildcard host":           {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"*.tether.example.com"}},
		"peer domain":             {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"b.relay.tether.invalid"}},
		"parent of peer domain":   {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"invalid"}},
		"outside cluster domains": {RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"com"}},
	} {
		_, err := ca.Issue(req)
		if controlplane.KindOf(err) != controlplane.KindInvalid {
			t.Errorf("%s: got %v, want an invalid-request error", name, err)
		}
	}
}

// TestDevCARoot: a root made by relay/devca (path length 0) still issues
// peer certificates, and refuses intermediates with a clear message.
func TestDevCARoot(t *testing.T) {
	dir := t.TempDir()
	if _, err := devca.LoadOrCreate(dir); err != nil {
		t.Fatal(err)
	}
	ca, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, der := ecKey(t)
	issue(t, ca, controlplane.CertRequest{RelayID: "a", Kind: controlplane.CertPeer, PublicKey: der})
	_, err = ca.Issue(controlplane.CertRequest{RelayID: "a", Kind: controlplane.CertIntermediate, PublicKey: der, Hosts: []string{"localhost"}})
	if controlplane.KindOf(err) != controlplane.KindInvalid || !strings.Contains(err.Error(), "cannot sign intermediates") {
		t.Fatalf("intermediate under a dev CA: %v", err)
	}
}
