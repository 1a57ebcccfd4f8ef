// Package devca makes a self-signed CA in a directory (ca.pem, ca-key.pem)
// and server certificates under it, for tests. It is also the layout of
// the development CA that relays before the cluster release made, which
// controlplane/clusterca loads. Relays now get their certificates from the
// cluster CA (controlplane/clusterca, relay/certs.go).
package devca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tetherfleet/tether/frames/secretfile"
)

// CA is a loaded development CA.
type CA struct {
	Cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	CertPEM []byte
	// Path is the ca.pem file agents pass as TETHER_RELAY_CA.
	Path string
}

// LoadOrCreate loads dir/ca.pem and dir/ca-key.pem, creating them on first use.
func LoadOrCreate(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	certPEM, err1 := os.ReadFile(certPath)
	keyPEM, err2 := secretfile.Read(keyPath)
	if err1 == nil && err2 == nil {
		ca, err := parse(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("load dev CA from %s: %w", dir, err)
		}
		ca.Path = certPath
		return ca, nil
	}
	if !errors.Is(err1, os.ErrNotExist) && err1 != nil {
		return nil, fmt.Errorf("read %s: %w", certPath, err1)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Tether development CA (" + host + ")", Organization: []string{"Tether dev"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create dev CA: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := secretfile.Write(keyPath, keyPEM); err != nil {
		return nil, fmt.Errorf("write dev CA key: %w", err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("write dev CA: %w", err)
	}
	ca, err := parse(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	ca.Path = certPath
	return ca, nil
}

func parse(certPEM, keyPEM []byte) (*CA, error) {
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, errors.New("not PEM")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, key: key, CertPEM: certPEM}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

// ServerCert issues a certificate for the given DNS names and IP addresses,
// valid for a year.
func (ca *CA) ServerCert(hosts []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue relay certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key}, nil
}

// Pool returns a cert pool that trusts only this CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// TLSConfig returns a server TLS config that presents a certificate for
// each requested name (SNI), issued on first use and cached: wildcards
// directly under a one-label domain such as *.localhost are not accepted by
// browsers or OpenSSL, so every service hostname gets its own. Names that
// are neither in hosts nor a direct subdomain of domain get the certificate
// for hosts.
func (ca *CA) TLSConfig(domain string, hosts []string) (*tls.Config, error) {
	def, err := ca.ServerCert(hosts)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	cache := map[string]*tls.Certificate{}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
			label, ok := strings.CutSuffix(name, "."+domain)
			if !ok || label == "" || strings.Contains(label, ".") {
				return &def, nil
			}
			mu.Lock()
			defer mu.Unlock()
			if c, ok := cache[name]; ok {
				return c, nil
			}
			if len(cache) >= 10000 {
				clear(cache) // bound memory; certificates are cheap to issue again
			}
			c, err := ca.ServerCert([]string{name})
			if err != nil {
				return nil, err
			}
			cache[name] = &c
			return &c, nil
		},
	}, nil
}
