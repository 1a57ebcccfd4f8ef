// Package clusterca is the cluster's certificate authority, held by the
// control plane: its root (<data dir>/ca.pem) is what agents trust, and it
// certifies keys that relays generate: a peer certificate per relay (for
// relay-to-relay TLS, naming the relay ID) and a name-constrained
// intermediate CA with which a relay issues its public certificates. The
// root's key never leaves the control plane.
//
// The files are those of relay/devca (ca.pem, ca-key.pem), so a
// standalone relay and its embedded control plane share one root.
package clusterca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames/secretfile"
)

// PeerDomain is the domain of relays' peer names: relay ID r is
// r.relay.tether.invalid in its peer certificate. Intermediates may never
// issue names in it.
const PeerDomain = "relay.tether.invalid"

// PeerName is the DNS name in the peer certificate of relay id.
func PeerName(id string) string { return id + "." + PeerDomain }

// Limits of a request.
const (
	// MaxHosts bounds the names and addresses of an intermediate.
	MaxHosts = 64
	// Validity of what the CA issues.
	PeerValidity         = 365 * 24 * time.Hour
	IntermediateValidity = 365 * 24 * time.Hour
)

// CA is a loaded cluster CA.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	// Path is the root's file (ca.pem), which agents trust.
	Path string
	key  crypto.Signer
	// Domains, when not empty, are the only DNS domains an intermediate
	// may be constrained to: each name a relay asks for must be one of
	// them or under one. Empty means any name.
	Domains []string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// LoadOrCreate loads dir/ca.pem and dir/ca-key.pem, creating them (key
// 0600) on first use.
func LoadOrCreate(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	certPEM, certErr := os.ReadFile(certPath)
	keyPEM, keyErr := secretfile.Read(keyPath) // refused when others may read it
	switch {
	case certErr == nil && keyErr == nil:
		ca, err := parse(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("load cluster CA from %s: %w", dir, err)
		}
		ca.Path = certPath
		return ca, nil
	case !errors.Is(certErr, fs.ErrNotExist) && certErr != nil:
		return nil, fmt.Errorf("read %s: %w", certPath, certErr)
	case !errors.Is(keyErr, fs.ErrNotExist) && keyErr != nil:
		return nil, fmt.Errorf("read %s: %w", keyPath, keyErr)
	case certErr == nil || keyErr == nil:
		return nil, fmt.Errorf("cluster CA in %s: ca.pem and ca-key.pem must both exist or neither", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate cluster CA key: %w", err)
	}
	host, _ := os.Hostname()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Tether cluster CA (" + host + ")", Organization: []string{"Tether"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1, // room for the relays' intermediates, no deeper
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create cluster CA: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode cluster CA key: %w", err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	// The key first: a ca.pem without its key would be loaded as broken.
	if err := secretfile.Write(keyPath, keyPEM); err != nil {
		return nil, fmt.Errorf("write cluster CA key: %w", err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("write cluster CA: %w", err)
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
		return nil, fmt.Errorf("parse certificate: %w", err)
	}
	var key crypto.Signer
	if kb.Type == "EC PRIVATE KEY" {
		key, err = x509.ParseECPrivateKey(kb.Bytes)
	} else {
		var k any
		if k, err = x509.ParsePKCS8PrivateKey(kb.Bytes); err == nil {
			var ok bool
			if key, ok = k.(crypto.Signer); !ok {
				err = fmt.Errorf("key of type %T cannot sign", k)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("parse key: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("ca.pem is not a CA certificate")
	}
	return &CA{Cert: cert, key: key, CertPEM: certPEM}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func (ca *CA) now() time.Time {
	if ca.Now != nil {
		return ca.Now()
	}
	return time.Now()
}

// Issue certifies a relay's key: req.Kind is controlplane.CertPeer or
// controlplane.CertIntermediate. A bad request is a KindInvalid error.
func (ca *CA) Issue(req controlplane.CertRequest) (controlplane.CertResponse, error) {
	if err := controlplane.ValidRelayID(req.RelayID); err != nil {
		return controlplane.CertResponse{}, err
	}
	pub, err := relayKey(req.PublicKey)
	if err != nil {
		return controlplane.CertResponse{}, err
	}
	now := ca.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             now.Add(-time.Hour),
		BasicConstraintsValid: true,
	}
	switch req.Kind {
	case controlplane.CertPeer:
		if len(req.Hosts) != 0 {
			return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindInvalid, "a peer certificate names the relay ID only; hosts are for an intermediate")
		}
		tmpl.Subject = pkix.Name{CommonName: req.RelayID, OrganizationalUnit: []string{"Tether relay peer"}}
		tmpl.NotAfter = now.Add(PeerValidity)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		tmpl.DNSNames = []string{PeerName(req.RelayID)}
	case controlplane.CertIntermediate:
		if ca.Cert.MaxPathLenZero || ca.Cert.MaxPathLen == 0 {
			return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindInvalid,
				"the cluster CA %s was made as a development CA that cannot sign intermediates: move ca.pem and ca-key.pem aside to make a new one (agents then trust the new ca.pem)", ca.Path)
		}
		names, ips, err := constraints(req.Hosts, ca.Domains)
		if err != nil {
			return controlplane.CertResponse{}, err
		}
		tmpl.Subject = pkix.Name{CommonName: "Tether relay " + req.RelayID + " intermediate", OrganizationalUnit: []string{"Tether relay CA"}}
		tmpl.NotAfter = now.Add(IntermediateValidity)
		tmpl.IsCA, tmpl.MaxPathLen, tmpl.MaxPathLenZero = true, 0, true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} // public servers only: never a peer's client
		tmpl.PermittedDNSDomainsCritical = true
		tmpl.PermittedDNSDomains, tmpl.PermittedIPRanges = names, ips
		tmpl.ExcludedDNSDomains = []string{PeerDomain}
	default:
		return controlplane.CertResponse{}, controlplane.Errorf(controlplane.KindInvalid, "certificate kind %q is neither %q nor %q", req.Kind, controlplane.CertPeer, controlplane.CertIntermediate)
	}
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
	if err != nil {
		return controlplane.CertResponse{}, fmt.Errorf("issue %s certificate for relay %s: %w", req.Kind, req.RelayID, err)
	}
	return controlplane.CertResponse{Cert: der, Root: ca.Cert.Raw}, nil
}

// relayKey parses a relay's public key: ECDSA P-256 or P-384, or Ed25519.
func relayKey(der []byte) (crypto.PublicKey, error) {
	if len(der) == 0 || len(der) > 1024 {
		return nil, controlplane.Errorf(controlplane.KindInvalid, "public key: want PKIX DER of at most 1024 bytes, got %d", len(der))
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, controlplane.Errorf(controlplane.KindInvalid, "public key: %v", err)
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return k, nil
		}
	case ed25519.PublicKey:
		return k, nil
	}
	return nil, controlplane.Errorf(controlplane.KindInvalid, "public key of type %T: want ECDSA P-256 or P-384, or Ed25519", pub)
}

// constraints turns an intermediate's hosts into its permitted DNS
// domains and IP ranges: DNS names (a name permits itself and its
// subdomains) and single IP addresses.
func constraints(hosts, domains []string) ([]string, []*net.IPNet, error) {
	if len(hosts) == 0 || len(hosts) > MaxHosts {
		return nil, nil, controlplane.Errorf(controlplane.KindInvalid, "an intermediate needs 1 to %d hosts, got %d", MaxHosts, len(hosts))
	}
	var names []string
	var ips []*net.IPNet
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			bits := 128
			if ip4 := ip.To4(); ip4 != nil {
				ip, bits = ip4, 32
			}
			ips = append(ips, &net.IPNet{IP: ip, Mask: net.CIDRMask(bits, bits)})
			continue
		}
		name := strings.ToLower(strings.TrimSuffix(h, "."))
		if err := validDNSName(name); err != nil {
			return nil, nil, err
		}
		if within(name, PeerDomain) || within(PeerDomain, name) {
			return nil, nil, controlplane.Errorf(controlplane.KindInvalid, "host %q overlaps the relays' peer names (%s)", h, PeerDomain)
		}
		if len(domains) > 0 && !slices.ContainsFunc(domains, func(d string) bool { return within(name, d) }) {
			return nil, nil, controlplane.Errorf(controlplane.KindInvalid, "host %q is outside the cluster's domains (%s)", h, strings.Join(domains, ", "))
		}
		names = append(names, name)
	}
	return names, ips, nil
}

// within reports whether name is domain or under it.
func within(name, domain string) bool {
	return name == domain || strings.HasSuffix(name, "."+domain)
}

// validDNSName checks a host name: 1 to 253 characters of labels of a-z,
// 0-9 and inner '-', each 1 to 63 long. Wildcards are refused: a name
// already permits its subdomains.
func validDNSName(name string) error {
	bad := func(why string) error {
		return controlplane.Errorf(controlplane.KindInvalid, "host %q is neither an IP address nor a DNS name: %s", name, why)
	}
	if name == "" || len(name) > 253 {
		return bad("length")
	}
	for label := range strings.SplitSeq(name, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return bad("empty, long or hyphen-edged label")
		}
		for _, c := range label {
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return bad(fmt.Sprintf("character %q", c))
			}
		}
	}
	return nil
}

// VerifyPeer checks a relay peer's certificate chain as presented in a
// TLS handshake and returns its relay ID. The leaf must be issued by root
// itself (intermediates, which relays hold, cannot mint peers), be valid
// for usage (x509.ExtKeyUsageServerAuth or ClientAuth) and name exactly
// one relay.
func VerifyPeer(root *x509.Certificate, rawCerts [][]byte, usage x509.ExtKeyUsage) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("verify relay peer: no certificate")
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return "", fmt.Errorf("verify relay peer: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return "", fmt.Errorf("verify relay peer: %w", err)
	}
	var id string
	for _, n := range leaf.DNSNames {
		if r, ok := strings.CutSuffix(n, "."+PeerDomain); ok {
			if id != "" || controlplane.ValidRelayID(r) != nil {
				return "", fmt.Errorf("verify relay peer: certificate names %v", leaf.DNSNames)
			}
			id = r
		}
	}
	if id == "" {
		return "", fmt.Errorf("verify relay peer: certificate names no relay (%v)", leaf.DNSNames)
	}
	return id, nil
}
