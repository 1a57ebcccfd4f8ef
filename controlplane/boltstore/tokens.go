package boltstore

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"fmt"
	"maps"
	"strings"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
)

var tokenEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// CreateToken makes an enrollment token usable uses times (≥1) until ttl
// (>0) passes. The secret is returned once; only its hash is stored.
func (s *Store) CreateToken(ctx context.Context, uses int, ttl time.Duration, labels map[string]string) (string, controlplane.Token, error) {
	return s.createToken(uses, ttl, labels, "")
}

// createToken makes a token; replaces, when set, is the revoked device
// whose name and leases the enrolled device takes (CreateReplaceToken).
func (s *Store) createToken(uses int, ttl time.Duration, labels map[string]string, replaces string) (string, controlplane.Token, error) {
	if uses < 1 {
		return "", controlplane.Token{}, controlplane.Errorf(controlplane.KindInvalid, "uses must be at least 1, not %d", uses)
	}
	if ttl <= 0 {
		return "", controlplane.Token{}, controlplane.Errorf(controlplane.KindInvalid, "ttl must be positive, not %v", ttl)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	secret := controlplane.TokenPrefix + strings.ToLower(tokenEncoding.EncodeToString(raw))
	key := tokenKey(secret)
	now := s.cfg.Now().UTC()
	tok := controlplane.Token{
		ID: string(key[:12]), Uses: uses, ExpiresAt: now.Add(ttl),
		Labels: maps.Clone(labels), CreatedAt: now, Replaces: replaces,
	}
	err := s.db.Update(func(tx *bolt.Tx) error { return putJSON(tx.Bucket(bucketTokens), key, tok) })
	if err != nil {
		return "", controlplane.Token{}, fmt.Errorf("store token: %w", err)
	}
	return secret, tok, nil
}

func tokenKey(secret string) []byte { return []byte(controlplane.TokenHash(secret)) }

// Tokens lists the enrollment tokens (without secrets).
func (s *Store) Tokens(ctx context.Context) ([]controlplane.Token, error) {
	var out []controlplane.Token
	err := s.db.View(func(tx *bolt.Tx) error {
		return forEachJSON(tx.Bucket(bucketTokens), func(t controlplane.Token) { out = append(out, t) })
	})
	return out, err
}
