package relay_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/controlplanetest"
	"github.com/tetherfleet/tether/relay"
	"github.com/tetherfleet/tether/relay/peer"
)

// unreachable is a control plane that never answers.
type unreachable struct{}

func (unreachable) Cert(context.Context, controlplane.CertRequest) (controlplane.CertResponse, error) {
	return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindUnavailable, "no answer on %s", controlplane.SubjectCert)
}

// TestCertsFromClusterCA: a relay's public certificates, issued by itself
// from its intermediate, and its peer certificate chain to the one root
// agents trust; the intermediate cannot issue outside its names; with the
// control plane away, the certificates kept in the data dir serve.
func TestCertsFromClusterCA(t *testing.T) {
	cp := controlplanetest.Start(t, controlplanetest.Options{})
	dir := t.TempDir()
	cfg := relay.CertConfig{
		RelayID: "relay-a", DataDir: dir, ControlPlane: cp.Relay(0, "relay-a"), Public: true,
		Domain: "localhost", Hosts: []string{"relay-a.localhost", "127.0.0.1"},
	}
	certs, err := relay.LoadCerts(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if certs.Kept {
		t.Error("fresh certificates reported as kept ones")
	}
	rootPEM, err := os.ReadFile(filepath.Join(cp.DataDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM) // what an agent's TETHER_RELAY_CA holds
	if kept, _ := os.ReadFile(certs.RootPath); string(kept) != string(rootPEM) {
		t.Errorf("%s is not the cluster root", certs.RootPath)
	}
	for _, name := range []string{"relay-ca-key.pem", "relay-peer-key.pem"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err == nil && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v", name, fi.Mode().Perm())
		}
	}

	serves := func(t *testing.T, conf *tls.Config, sni, verifyAs string) {
		t.Helper()
		c, err := conf.GetCertificate(&tls.ClientHelloInfo{ServerName: sni})
		if err != nil {
			t.Fatalf("SNI %q: %v", sni, err)
		}
		leaf, _ := x509.ParseCertificate(c.Certificate[0])
		inter := x509.NewCertPool()
		for _, der := range c.Certificate[1:] {
			ic, _ := x509.ParseCertificate(der)
			inter.AddCert(ic)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: verifyAs}); err != nil {
			t.Errorf("SNI %q verified as %q: %v", sni, verifyAs, err)
		}
	}
	serves(t, certs.TLS, "web-pi01.localhost", "web-pi01.localhost")
	serves(t, certs.TLS, "", "127.0.0.1")
	serves(t, certs.TLS, "relay-a.localhost", "relay-a.localhost")
	if _, err := peer.New(peer.Config{RelayID: "relay-a", Cert: certs.Peer, Roots: roots}); err != nil {
		t.Errorf("the peer certificate is no peer identity: %v", err)
	}

	// The intermediate is constrained to the relay's names: a leaf signed
	// with its key (kept in the data dir) for another name does not verify.
	t.Run("name constrained", func(t *testing.T) {
		ca, err := tls.LoadX509KeyPair(filepath.Join(dir, "relay-ca.pem"), filepath.Join(dir, "relay-ca-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		caCert, _ := x509.ParseCertificate(ca.Certificate[0])
		for name, ok := range map[string]bool{"web-pi01.localhost": true, "bank.example.com": false, "relay-b" + ".relay.tether.invalid": false} {
			key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), DNSNames: []string{name}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
				ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, ca.PrivateKey)
			if err != nil {
				t.Fatal(err)
			}
			leaf, _ := x509.ParseCertificate(der)
			inter := x509.NewCertPool()
			inter.AddCert(caCert)
			_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: name})
			if (err == nil) != ok {
				t.Errorf("leaf for %s: verify error %v, want ok %v", name, err, ok)
			}
		}
	})

	t.Run("control plane away: kept certificates", func(t *testing.T) {
		cfg := cfg
		cfg.ControlPlane = unreachable{}
		kept, err := relay.LoadCerts(t.Context(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if !kept.Kept || !kept.Root.Equal(certs.Root) {
			t.Fatalf("kept %v, same root %v", kept.Kept, kept.Root.Equal(certs.Root))
		}
		serves(t, kept.TLS, "ssh-pi02.localhost", "ssh-pi02.localhost")
	})

	t.Run("control plane away on a first start: waits, then says why", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 1500*time.Millisecond)
		defer cancel()
		_, err := relay.LoadCerts(ctx, relay.CertConfig{RelayID: "relay-b", DataDir: t.TempDir(), ControlPlane: unreachable{}, Public: true})
		if err == nil || !strings.Contains(err.Error(), "unreachable") || !strings.Contains(err.Error(), "none are kept") {
			t.Fatalf("got %v", err)
		}
	})
}
