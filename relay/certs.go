package relay

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames/secretfile"
)

// Files a relay keeps its certificates in, in its data dir. The root is
// ca.pem, the file agents trust (TETHER_RELAY_CA).
const (
	rootFile             = "ca.pem"
	intermediateFile     = "relay-ca.pem"
	intermediateKeyFile  = "relay-ca-key.pem"
	peerCertFile         = "relay-peer.pem"
	peerKeyFile          = "relay-peer-key.pem"
	maxIntermediateHosts = 64 // clusterca.MaxHosts
)

// Certifier is the control plane's certificate endpoint
// (controlplane.Cluster's Cert).
type Certifier interface {
	Cert(ctx context.Context, req controlplane.CertRequest) (controlplane.CertResponse, error)
}

// CertConfig configures LoadCerts.
type CertConfig struct {
	// RelayID names the relay in its peer certificate. Required.
	RelayID string
	// DataDir keeps the certificates and keys (keys 0600) and the
	// cluster root (ca.pem). Required.
	DataDir string
	// ControlPlane certifies the relay's keys. Required.
	ControlPlane Certifier
	// Public asks for a name-constrained intermediate CA too, from which
	// the relay issues its public certificates (Certs.TLS). False means
	// the relay has certificate files of its own.
	Public bool
	// Domain is the base domain of service hostnames: the intermediate
	// covers it and every name under it. Empty means "localhost".
	Domain string
	// Hosts are the other names and IP addresses the public certificates
	// cover: the relay's public names and listen addresses (ListenHosts).
	Hosts []string
	// Logger; nil discards.
	Logger *slog.Logger
}

// Certs are a relay's certificates, all under the cluster root.
type Certs struct {
	// Root is the cluster root; RootPath the file it is kept in.
	Root     *x509.Certificate
	RootPath string
	// Peer is the relay's identity towards its peers: a leaf issued by the
	// root itself to the relay ID.
	Peer tls.Certificate
	// TLS serves the public HTTPS listener with certificates the relay
	// issues itself from its intermediate, one per SNI name under the
	// domain (browsers accept no wildcard directly under a one-label
	// domain such as localhost). Nil unless CertConfig.Public.
	TLS *tls.Config
	// Kept says the control plane could not be reached: the certificates
	// are those kept in the data dir from an earlier start.
	Kept bool
}

// Roots returns a pool holding only the cluster root.
func (c *Certs) Roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Root)
	return p
}

// LoadCerts has the cluster CA certify new keys of the relay (a peer
// certificate, and with cfg.Public an intermediate CA) and keeps them in
// the data dir, with the root as ca.pem. When the control plane cannot be
// reached, it loads the ones kept by an earlier start instead.
func LoadCerts(ctx context.Context, cfg CertConfig) (*Certs, error) {
	if cfg.RelayID == "" || cfg.DataDir == "" || cfg.ControlPlane == nil {
		return nil, errors.New("relay certificates: RelayID, DataDir and ControlPlane are required")
	}
	cfg.Domain = strings.ToLower(strings.TrimSuffix(cmp.Or(cfg.Domain, "localhost"), "."))
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("relay certificates: %w", err)
	}
	var m *material
	var err error
	for wait := time.Second; ; wait = min(2*wait, 10*time.Second) {
		if m, err = requestCerts(ctx, cfg); err == nil {
			if err := m.keep(cfg.DataDir); err != nil {
				return nil, err
			}
			break
		}
		if controlplane.KindOf(err) != controlplane.KindUnavailable {
			return nil, fmt.Errorf("relay certificates: %w", err)
		}
		kept, kerr := loadKept(cfg.DataDir, cfg.Public)
		if insecure := (*secretfile.InsecureError)(nil); errors.As(kerr, &insecure) {
			return nil, fmt.Errorf("relay certificates: the control plane is unreachable (%w) and the kept key is not private: %w", err, kerr)
		}
		if kerr == nil {
			log.Warn("control plane unreachable: using the certificates kept in the data dir", "dir", cfg.DataDir, "err", err)
			m = kept
			break
		}
		// A first start: nothing to fall back on but waiting.
		log.Warn("control plane unreachable and no certificates kept yet: waiting for it", "err", err, "kept", kerr, "retry_in", wait)
		if !sleep(ctx.Done(), wait) {
			return nil, fmt.Errorf("relay certificates: the control plane is unreachable (%w) and none are kept in %s: %w", err, cfg.DataDir, kerr)
		}
	}
	certs := &Certs{Root: m.root, RootPath: filepath.Join(cfg.DataDir, rootFile), Peer: m.peer, Kept: err != nil}
	if cfg.Public {
		hosts := intermediateHosts(cfg.Domain, cfg.Hosts)
		certs.TLS = m.issuer.tlsConfig(cfg.Domain, hosts)
		if _, err := certs.TLS.GetCertificate(&tls.ClientHelloInfo{}); err != nil {
			return nil, fmt.Errorf("relay certificates: issue the default certificate: %w", err)
		}
	}
	return certs, nil
}

// material is what LoadCerts gets or loads.
type material struct {
	root       *x509.Certificate
	peer       tls.Certificate
	peerKeyPEM []byte
	issuer     *issuer // nil without an intermediate
}

// requestCerts has the control plane certify two new keys.
func requestCerts(ctx context.Context, cfg CertConfig) (*material, error) {
	peerKey, peerDER, err := newKey()
	if err != nil {
		return nil, err
	}
	resp, err := cfg.ControlPlane.Cert(ctx, controlplane.CertRequest{RelayID: cfg.RelayID, Kind: controlplane.CertPeer, PublicKey: peerDER})
	if err != nil {
		return nil, fmt.Errorf("request the peer certificate: %w", err)
	}
	root, err := x509.ParseCertificate(resp.Root)
	if err != nil {
		return nil, fmt.Errorf("parse the cluster root: %w", err)
	}
	m := &material{root: root, peer: tls.Certificate{Certificate: [][]byte{resp.Cert}, PrivateKey: peerKey}, peerKeyPEM: keyPEM(peerKey)}
	if err := m.checkPeer(); err != nil {
		return nil, err
	}
	if !cfg.Public {
		return m, nil
	}
	caKey, caDER, err := newKey()
	if err != nil {
		return nil, err
	}
	resp, err = cfg.ControlPlane.Cert(ctx, controlplane.CertRequest{RelayID: cfg.RelayID, Kind: controlplane.CertIntermediate,
		PublicKey: caDER, Hosts: intermediateHosts(cfg.Domain, cfg.Hosts)})
	if err != nil {
		return nil, fmt.Errorf("request the intermediate CA: %w", err)
	}
	if !bytes.Equal(resp.Root, root.Raw) {
		return nil, errors.New("the control plane answered with two different roots")
	}
	if m.issuer, err = newIssuer(resp.Cert, caKey, root); err != nil {
		return nil, err
	}
	return m, nil
}

// checkPeer checks that the peer certificate chains to the root.
func (m *material) checkPeer() error {
	leaf, err := x509.ParseCertificate(m.peer.Certificate[0])
	if err != nil {
		return fmt.Errorf("parse the peer certificate: %w", err)
	}
	m.peer.Leaf = leaf
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: poolOf(m.root), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("the peer certificate: %w", err)
	}
	return nil
}

// keep writes the material to dir: the keys first, 0600, each file
// replaced whole.
func (m *material) keep(dir string) error {
	type file struct {
		name string
		data []byte
		mode os.FileMode
	}
	files := []file{{peerKeyFile, m.peerKeyPEM, 0o600}, {peerCertFile, certPEM(m.peer.Certificate[0]), 0o644}}
	if m.issuer != nil {
		files = append(files, file{intermediateKeyFile, keyPEM(m.issuer.key), 0o600}, file{intermediateFile, certPEM(m.issuer.cert.Raw), 0o644})
	}
	root := certPEM(m.root.Raw)
	if old, err := os.ReadFile(filepath.Join(dir, rootFile)); err != nil || !bytes.Equal(old, root) {
		files = append(files, file{rootFile, root, 0o644})
	}
	for _, f := range files {
		write := func(path string, data []byte) error { return writeFile(path, data, f.mode) }
		if f.mode == 0o600 {
			write = secretfile.Write
		}
		if err := write(filepath.Join(dir, f.name), f.data); err != nil {
			return fmt.Errorf("keep relay certificates: %w", err)
		}
	}
	return nil
}

// loadKept loads the material an earlier start kept in dir.
func loadKept(dir string, public bool) (*material, error) {
	read := func(name string) ([]byte, error) {
		if name == peerKeyFile || name == intermediateKeyFile {
			return secretfile.Read(filepath.Join(dir, name)) // refused when others may read it
		}
		return os.ReadFile(filepath.Join(dir, name))
	}
	rootPEM, err := read(rootFile)
	if err != nil {
		return nil, err
	}
	root, err := parseCertPEM(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rootFile, err)
	}
	m := &material{root: root}
	peerCert, err := read(peerCertFile)
	if err != nil {
		return nil, err
	}
	peerKey, err := read(peerKeyFile)
	if err != nil {
		return nil, err
	}
	if m.peer, err = tls.X509KeyPair(peerCert, peerKey); err != nil {
		return nil, fmt.Errorf("%s: %w", peerCertFile, err)
	}
	if err := m.checkPeer(); err != nil {
		return nil, err
	}
	if !public {
		return m, nil
	}
	caPEM, err := read(intermediateFile)
	if err != nil {
		return nil, err
	}
	caKeyPEM, err := read(intermediateKeyFile)
	if err != nil {
		return nil, err
	}
	ca, err := parseCertPEM(caPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", intermediateFile, err)
	}
	kb, _ := pem.Decode(caKeyPEM)
	if kb == nil {
		return nil, fmt.Errorf("%s: not PEM", intermediateKeyFile)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", intermediateKeyFile, err)
	}
	if m.issuer, err = newIssuer(ca.Raw, key, root); err != nil {
		return nil, err
	}
	return m, nil
}

// issuer issues the relay's public certificates from its intermediate.
type issuer struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newIssuer(der []byte, key *ecdsa.PrivateKey, root *x509.Certificate) (*issuer, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse the intermediate CA: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("the intermediate certificate is not a CA")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: poolOf(root), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("the intermediate CA: %w", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("the intermediate CA is not for its key")
	}
	return &issuer{cert: cert, key: key}, nil
}

// leaf issues a server certificate for hosts (DNS names and IP
// addresses), valid for a year or until the intermediate expires.
func (is *issuer) leaf(hosts []string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: hosts[0]},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if tmpl.NotAfter.After(is.cert.NotAfter) {
		tmpl.NotAfter = is.cert.NotAfter
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, is.cert, &key.PublicKey, is.key)
	if err != nil {
		return nil, fmt.Errorf("issue a certificate for %v: %w", hosts, err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, is.cert.Raw}, PrivateKey: key}, nil
}

// maxIssued bounds the per-name certificates kept in memory.
const maxIssued = 10000

// tlsConfig serves a certificate per SNI name directly under domain
// (issued on first use and kept), and one for hosts to every other name.
func (is *issuer) tlsConfig(domain string, hosts []string) *tls.Config {
	var mu sync.Mutex
	var def *tls.Certificate
	issued := map[string]*tls.Certificate{}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
			label, ok := strings.CutSuffix(name, "."+domain)
			if !ok || label == "" || strings.Contains(label, ".") || slices.Contains(hosts, name) {
				name = "" // the default certificate
			}
			mu.Lock()
			defer mu.Unlock()
			if name == "" && def != nil {
				return def, nil
			}
			if c, ok := issued[name]; ok {
				return c, nil
			}
			if name == "" {
				c, err := is.leaf(hosts)
				def = c
				return c, err
			}
			if len(issued) >= maxIssued {
				clear(issued) // bound memory; certificates are cheap to issue again
			}
			c, err := is.leaf([]string{name})
			if err != nil {
				return nil, err
			}
			issued[name] = c
			return c, nil
		},
	}
}

// intermediateHosts are the hosts the intermediate is constrained to:
// the domain first, then hosts, without repeats, at most
// maxIntermediateHosts.
func intermediateHosts(domain string, hosts []string) []string {
	out := []string{domain}
	for _, h := range hosts {
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		if h != "" && !slices.Contains(out, h) && len(out) < maxIntermediateHosts {
			out = append(out, h)
		}
	}
	return out
}

// ListenHosts returns the hosts of listen addresses ("host:port") that a
// certificate should cover: a named host or address as it is, and for a
// wildcard address (":8443", "0.0.0.0:8443", "[::]:8443") the addresses of
// the machine's interfaces.
func ListenHosts(addrs ...string) []string {
	var out []string
	add := func(h string) {
		if !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			continue
		}
		if ip := net.ParseIP(host); host != "" && (ip == nil || !ip.IsUnspecified()) {
			add(host)
			continue
		}
		ifaddrs, err := net.InterfaceAddrs()
		if err != nil {
			add("127.0.0.1")
			continue
		}
		for _, ia := range ifaddrs {
			if n, ok := ia.(*net.IPNet); ok && !n.IP.IsLinkLocalUnicast() {
				add(n.IP.String())
			}
		}
	}
	return out
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate a key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	return key, der, err
}

func keyPEM(key *ecdsa.PrivateKey) []byte {
	der, _ := x509.MarshalECPrivateKey(key) // a P-256 key always encodes
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("not a PEM certificate")
	}
	return x509.ParseCertificate(block.Bytes)
}

func poolOf(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}

// writeFile replaces path whole: it writes a temporary file beside it
// and renames it.
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
