package frames

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base32"
	"strings"
)

// authDomain separates Tether's handshake signatures from any other use of a
// device key.
const authDomain = "tether-auth-v1\x00"

// AuthMessage is what an agent signs to answer a Challenge: a domain string,
// the relay's nonce, the device's public key and the relay's ID. A signature
// is valid for one connection only, since every connection gets a new nonce.
func AuthMessage(nonce [32]byte, pub [32]byte, relayID string) []byte {
	b := make([]byte, 0, len(authDomain)+64+len(relayID))
	b = append(b, authDomain...)
	b = append(b, nonce[:]...)
	b = append(b, pub[:]...)
	return append(b, relayID...)
}

// VerifyAuth reports whether sig signs AuthMessage(nonce, pub, relayID) under pub.
func VerifyAuth(pub [32]byte, nonce [32]byte, relayID string, sig [64]byte) bool {
	return ed25519.Verify(pub[:], AuthMessage(nonce, pub, relayID), sig[:])
}

var idEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// DeviceID derives a device's stable ID from its public key: "d" followed by
// 16 base32 characters of the key's SHA-256 (80 bits).
func DeviceID(pub []byte) string {
	sum := sha256.Sum256(pub)
	return "d" + strings.ToLower(idEncoding.EncodeToString(sum[:10]))
}
