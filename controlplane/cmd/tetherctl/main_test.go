package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/boltstore"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/frames"
)

// cluster stands in for the control plane's NATS side.
type cluster struct {
	store       *boltstore.Store
	relays      []controlplane.RelayInfo
	confirmed   []string
	pending     []string
	undelivered string
}

func (c *cluster) Relays() []controlplane.RelayInfo { return c.relays }

func (c *cluster) Revoke(ctx context.Context, nameOrID string) (controlplane.RevokeResult, error) {
	d, err := c.store.Revoke(ctx, nameOrID)
	return controlplane.RevokeResult{Device: d, Confirmed: c.confirmed, Pending: c.pending, Undelivered: c.undelivered}, err
}

func (c *cluster) ReleaseLease(ctx context.Context, name string) (controlplane.Lease, error) {
	return c.store.ReleaseLease(ctx, name)
}

func (c *cluster) DeleteDevice(ctx context.Context, nameOrID string, keepNames bool) (controlplane.RevokeResult, []controlplane.Lease, error) {
	res, err := c.Revoke(ctx, nameOrID)
	if err != nil {
		return res, nil, err
	}
	_, leases, err := c.store.DeleteDevice(ctx, res.Device.ID, keepNames)
	return res, leases, err
}

func (c *cluster) ReplaceDevice(ctx context.Context, nameOrID string, ttl time.Duration) (controlplane.RevokeResult, string, controlplane.Token, error) {
	res, err := c.Revoke(ctx, nameOrID)
	if err != nil {
		return res, "", controlplane.Token{}, err
	}
	secret, tok, err := c.store.CreateReplaceToken(ctx, res.Device.ID, ttl)
	return res, secret, tok, err
}

// admin serves the admin API over a store with one device, pi01, whose
// ssh service holds port 20000.
func admin(t *testing.T) (*cluster, []string) {
	t.Helper()
	st, err := boltstore.Open(boltstore.Config{Path: filepath.Join(t.TempDir(), "cp.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ctx := t.Context()
	tok, _, _ := st.CreateToken(ctx, 1, time.Hour, nil)
	pub, _, _ := ed25519.GenerateKey(nil)
	if _, err := st.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: pub, Name: "pi01"}}); err != nil {
		t.Fatal(err)
	}
	cr, err := st.Connect(ctx, controlplane.ConnectRequest{PublicKey: pub, RelayID: "relay-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Register(ctx, controlplane.RegisterRequest{DeviceID: cr.DeviceID, Generation: cr.Generation,
		Services: []controlplane.Service{{Name: "ssh", Proto: "tcp"}}}); err != nil {
		t.Fatal(err)
	}
	c := &cluster{store: st}
	srv := httptest.NewServer(httpapi.Handler(httpapi.Config{Store: st, Cluster: c, Token: "tta_test"}))
	t.Cleanup(srv.Close)
	return c, []string{"--admin-url", srv.URL, "--admin-token", "tta_test"}
}

func ctl(t *testing.T, flags []string, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := run(t.Context(), append(append([]string{}, flags...), args...), &out, &errOut)
	return out.String() + errOut.String(), err
}

func TestRevokeSaysCutOffOnlyWhenEveryLiveRelayConfirmed(t *testing.T) {
	for _, tc := range []struct {
		name               string
		confirmed, pending []string
		undelivered        string
		want               []string
		unconfirmed        bool
	}{
		{name: "all confirmed", confirmed: []string{"a", "b", "c"},
			want: []string{"revoked pi01", "cut off: confirmed by every live relay (a, b, c)"}},
		{name: "one pending", confirmed: []string{"a", "b"}, pending: []string{"c"}, unconfirmed: true,
			want: []string{"revoked pi01", "in the control plane; not yet confirmed by relay c: it applies the revocation when it reaches the control plane again", "confirmed by relays a, b"}},
		{name: "NATS down", pending: []string{"a"}, undelivered: "the relays could not be told: not connected to NATS", unconfirmed: true,
			want: []string{"revoked pi01", "NATS is unreachable", "not yet confirmed by relay a"}},
		{name: "no live relay",
			want: []string{"revoked pi01", "no relay is live"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, flags := admin(t)
			c.confirmed, c.pending, c.undelivered = tc.confirmed, tc.pending, tc.undelivered
			out, err := ctl(t, flags, "revoke", "pi01")
			var ex exitStatus
			if tc.unconfirmed {
				if !errors.As(err, &ex) || ex != 2 {
					t.Fatalf("exit: %v, want status 2\n%s", err, out)
				}
				if strings.Contains(out, "cut off") {
					t.Fatalf("says cut off while unconfirmed:\n%s", out)
				}
			} else if err != nil {
				t.Fatalf("revoke: %v\n%s", err, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Fatalf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestLeasesShowUnboundPorts(t *testing.T) {
	c, flags := admin(t)
	c.relays = []controlplane.RelayInfo{{ID: "relay-b", UnboundPorts: []uint16{20000}}, {ID: "relay-a"}, {ID: "relay-c", UnboundPorts: []uint16{20000, 20005}}}
	out, err := ctl(t, flags, "leases")
	if err != nil || !strings.Contains(out, "unbound on relay-b, relay-c") {
		t.Fatalf("leases: %v\n%s", err, out)
	}
	out, err = ctl(t, flags, "leases", "--json")
	var ls []controlplane.Lease
	if err != nil || json.Unmarshal([]byte(out), &ls) != nil || len(ls) != 1 || strings.Join(ls[0].UnboundOn, ",") != "relay-b,relay-c" {
		t.Fatalf("leases --json: %v\n%s", err, out)
	}
}

func TestRelays(t *testing.T) {
	c, flags := admin(t)
	c.relays = []controlplane.RelayInfo{{ID: "relay-a", ClusterAddr: "10.0.0.1:7444", Sessions: 12, LastSeen: time.Now()}}
	out, err := ctl(t, flags, "relays")
	if err != nil || !strings.Contains(out, "relay-a") || !strings.Contains(out, "10.0.0.1:7444") || !strings.Contains(out, "12") {
		t.Fatalf("relays: %v\n%s", err, out)
	}
	out, err = ctl(t, flags, "relays", "--json")
	var rs []controlplane.RelayInfo
	if err != nil || json.Unmarshal([]byte(out), &rs) != nil || len(rs) != 1 || rs[0].Sessions != 12 {
		t.Fatalf("relays --json: %v\n%s", err, out)
	}
}

// TestLeaseRelease: a lease in use is not released, and says why; once
// its device is revoked, it is.
func TestLeaseRelease(t *testing.T) {
	_, flags := admin(t)
	out, err := ctl(t, flags, "lease", "release", "20000")
	if err == nil || !strings.Contains(err.Error(), "in use by service ssh of device pi01") {
		t.Fatalf("release of a lease in use: %v\n%s", err, out)
	}
	if out, err := ctl(t, flags, "revoke", "pi01"); err != nil && !strings.Contains(out, "revoked pi01") {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	out, err = ctl(t, flags, "lease", "release", "20000")
	if err != nil || !strings.Contains(out, "released port 20000 (service ssh of device pi01)") {
		t.Fatalf("release after the revocation: %v\n%s", err, out)
	}
	if _, err := ctl(t, flags, "lease", "release"); err == nil {
		t.Fatal("usage not checked")
	}
}

// TestDeviceReplaceAndDelete: replace prints a token with which a new key
// takes pi01's name and port; delete frees them into quarantine.
func TestDeviceReplaceAndDelete(t *testing.T) {
	c, flags := admin(t)
	c.confirmed = []string{"relay-a"}
	out, err := ctl(t, flags, "device", "replace", "pi01", "--ttl", "1h")
	if err != nil || !strings.Contains(out, "enrolls one new device as pi01") {
		t.Fatalf("replace: %v\n%s", err, out)
	}
	token := strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
	if !strings.HasPrefix(token, "tth_") {
		t.Fatalf("replace printed %q first", out)
	}
	pub, _, _ := ed25519.GenerateKey(nil)
	resp, err := c.store.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(token), EnrollDevice: frames.EnrollDevice{PublicKey: pub, Name: "new"}})
	if err != nil || resp.Name != "pi01" {
		t.Fatalf("enroll with the replacement token: %+v %v", resp, err)
	}
	ls, _ := c.store.Leases(t.Context())
	if len(ls) != 1 || ls[0].Port != 20000 || ls[0].DeviceID != resp.DeviceID {
		t.Fatalf("leases after the replacement: %+v", ls)
	}
	out, err = ctl(t, flags, "device", "delete", "pi01")
	if err != nil || !strings.Contains(out, "deleted pi01: 1 lease(s); its names are in quarantine") {
		t.Fatalf("delete: %v\n%s", err, out)
	}
	if _, err := ctl(t, flags, "device", "delete", "pi01"); err == nil || !strings.Contains(err.Error(), "no device") {
		t.Fatalf("delete again: %v", err)
	}
}
