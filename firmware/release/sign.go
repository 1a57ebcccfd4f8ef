package release

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"aead.dev/minisign"
)

// Keys are the trusted release public keys.
type Keys []minisign.PublicKey

// ParseKeys parses public keys in minisign's base64 form ("RW…", as the
// second line of a minisign .pub file and TETHER_RELEASE_KEYS carry
// them); blank entries are skipped.
func ParseKeys(list []string) (Keys, error) {
	var keys Keys
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		var k minisign.PublicKey
		if err := k.UnmarshalText([]byte(s)); err != nil {
			return nil, fmt.Errorf("release public key %q: %w", trunc(s), err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Strings returns the keys in the form ParseKeys reads.
func (k Keys) Strings() []string {
	out := make([]string, len(k))
	for i, key := range k {
		out[i] = key.String()
	}
	return out
}

// ErrUnverified is wrapped by Verify's errors: the manifest is not signed
// by any trusted key.
var ErrUnverified = errors.New("release manifest not signed by a trusted release key")

// Verify checks that sig (a minisign .minisig file) is a signature of
// manifest by one of keys, then parses the manifest. A trusted comment
// carrying "version:X" must name the manifest's version. No keys: nothing
// verifies.
func Verify(manifest, sig []byte, keys Keys) (Manifest, error) {
	if len(sig) > MaxSignatureSize {
		return Manifest{}, fmt.Errorf("%w: signature of %d bytes, at most %d", ErrUnverified, len(sig), MaxSignatureSize)
	}
	if len(keys) == 0 {
		return Manifest{}, fmt.Errorf("%w: no release keys configured (TETHER_RELEASE_KEYS)", ErrUnverified)
	}
	var s minisign.Signature
	if err := s.UnmarshalText(sig); err != nil {
		return Manifest{}, fmt.Errorf("%w: %v", ErrUnverified, err)
	}
	verified := false
	for _, k := range keys {
		if minisign.Verify(k, manifest, sig) {
			verified = true
			break
		}
	}
	if !verified {
		return Manifest{}, fmt.Errorf("%w (signed by key ID %016X, trusted: %s)", ErrUnverified, s.KeyID, keyIDs(keys))
	}
	m, err := Parse(manifest)
	if err != nil {
		return Manifest{}, err
	}
	for field := range strings.SplitSeq(s.TrustedComment, "\t") {
		if v, ok := strings.CutPrefix(field, versionComment); ok && v != m.Version {
			return Manifest{}, fmt.Errorf("%w: the signature is for version %q, the manifest says %s", ErrUnverified, trunc(v), m.Version)
		}
	}
	return m, nil
}

func keyIDs(keys Keys) string {
	ids := make([]string, len(keys))
	for i, k := range keys {
		ids[i] = fmt.Sprintf("%016X", k.ID())
	}
	return strings.Join(ids, ", ")
}

// Sign checks manifest (Parse) and signs it with key, as minisign -S
// does (pre-hashed, BLAKE2b-512), with a trusted comment that carries the
// version. It returns the .minisig file.
func Sign(manifest []byte, key minisign.PrivateKey) ([]byte, error) {
	m, err := Parse(manifest)
	if err != nil {
		return nil, err
	}
	r := minisign.NewReader(bytes.NewReader(manifest))
	if _, err := io.Copy(io.Discard, r); err != nil {
		return nil, fmt.Errorf("hash manifest: %w", err)
	}
	untrusted := fmt.Sprintf("signature from tetherctl release key %016X", key.ID())
	return r.SignWithComments(key, trustedComment(m.Version, time.Now()), untrusted), nil
}

// GenerateKey makes a release key pair: the public key file (minisign's
// .pub: a comment line, then the key as ParseKeys reads it) and the
// unencrypted private key file (minisign's format, as `minisign -G -W`
// writes it).
func GenerateKey() (pubFile, privFile []byte, err error) {
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate release key: %w", err)
	}
	privFile, err = priv.MarshalText()
	if err != nil {
		return nil, nil, fmt.Errorf("encode release private key: %w", err)
	}
	pubFile = fmt.Appendf(nil, "untrusted comment: minisign public key %016X\n%s\n", pub.ID(), pub.String())
	return pubFile, append(privFile, '\n'), nil
}

// ReadPrivateKey decodes a minisign private key file; an encrypted one
// needs its password.
func ReadPrivateKey(data []byte, password string) (minisign.PrivateKey, error) {
	data = bytes.TrimSpace(data)
	if minisign.IsEncrypted(data) {
		if password == "" {
			return minisign.PrivateKey{}, errors.New("the release private key is encrypted: give its password")
		}
		k, err := minisign.DecryptKey(password, data)
		if err != nil {
			return minisign.PrivateKey{}, fmt.Errorf("decrypt release private key: %w", err)
		}
		return k, nil
	}
	var k minisign.PrivateKey
	if err := k.UnmarshalText(data); err != nil {
		return minisign.PrivateKey{}, fmt.Errorf("decode release private key: %w", err)
	}
	return k, nil
}

// ReadPublicKey decodes a minisign public key file (or the bare key).
func ReadPublicKey(data []byte) (minisign.PublicKey, error) {
	var k minisign.PublicKey
	if err := k.UnmarshalText(bytes.TrimSpace(data)); err != nil {
		return k, fmt.Errorf("decode release public key: %w", err)
	}
	return k, nil
}
