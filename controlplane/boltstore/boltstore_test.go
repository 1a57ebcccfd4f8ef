package boltstore

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	bolt "go.etcd.io/bbolt"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration)     { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func newClock() *clock                   { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }
func key(t *testing.T) ed25519.PublicKey { pub, _, _ := ed25519.GenerateKey(nil); return pub }

func mustOpen(t *testing.T, path string, c *clock) *Store {
	t.Helper()
	s, err := Open(Config{Path: path, Now: c.Now, TCPPorts: controlplane.PortRange{First: 20000, Last: 20002}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustToken(t *testing.T, s *Store, uses int, ttl time.Duration) string {
	t.Helper()
	tok, _, err := s.CreateToken(t.Context(), uses, ttl, map[string]string{"site": "lab"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok, "tth_") {
		t.Fatalf("token %q lacks the prefix", tok)
	}
	return tok
}

func wantKind(t *testing.T, err error, k controlplane.Kind) {
	t.Helper()
	if err == nil || controlplane.KindOf(err) != k {
		t.Fatalf("got error %v, want kind %s", err, k)
	}
}

func TestEnrollTokenRules(t *testing.T) {
	c := newClock()
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), c)
	ctx := t.Context()
	tok := mustToken(t, s, 2, time.Hour)

	k1 := key(t)
	r1, err := s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: k1, Name: "pi01"}})
	if err != nil || r1.Name != "pi01" {
		t.Fatalf("enroll: %v %+v", err, r1)
	}
	// The same key again: succeeds, does not use the token up.
	if r, err := s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: k1, Name: "pi01"}}); err != nil || r.DeviceID != r1.DeviceID {
		t.Fatalf("re-enroll: %v", err)
	}
	// An explicit name that is taken is refused...
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi01"}})
	wantKind(t, err, controlplane.KindConflict)
	// ...a default (hostname) one is suffixed.
	r2, err := s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi01", NameIsDefault: true}})
	if err != nil || r2.Name != "pi01-2" {
		t.Fatalf("default name clash: %v %+v", err, r2)
	}
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi03"}})
	wantKind(t, err, controlplane.KindUnauthorized)
	if !strings.Contains(err.Error(), "used up") || strings.Contains(err.Error(), tok) {
		t.Fatalf("used-up message %q (must say why, must not echo the token)", err)
	}

	expiring := mustToken(t, s, 5, time.Minute)
	c.Add(time.Minute)
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(expiring), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi04"}})
	wantKind(t, err, controlplane.KindUnauthorized)
	if !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expiry message %q", err)
	}
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash("tth_nope"), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "pi05"}})
	wantKind(t, err, controlplane.KindUnauthorized)
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "Bad Name"}})
	wantKind(t, err, controlplane.KindInvalid)
	_, err = s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: []byte{1}, Name: "pi06"}})
	wantKind(t, err, controlplane.KindInvalid)

	d, err := s.Device(ctx, "pi01")
	if err != nil || d.Labels["site"] != "lab" {
		t.Fatalf("device labels: %v %+v", err, d)
	}
}

func enrolled(t *testing.T, s *Store, name string) ed25519.PublicKey {
	t.Helper()
	k := key(t)
	if _, err := s.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(mustToken(t, s, 1, time.Hour)), EnrollDevice: frames.EnrollDevice{PublicKey: k, Name: name}}); err != nil {
		t.Fatal(err)
	}
	return k
}

func connectRegister(t *testing.T, s *Store, k ed25519.PublicKey, svcs ...controlplane.Service) (controlplane.ConnectResponse, []controlplane.Lease) {
	t.Helper()
	cr, err := s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	ls, err := s.Register(t.Context(), controlplane.RegisterRequest{DeviceID: cr.DeviceID, Generation: cr.Generation, Services: svcs})
	if err != nil {
		t.Fatal(err)
	}
	return cr, ls
}

func TestLeasesStickyAndUnique(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cp.db")
	c := newClock()
	s := mustOpen(t, path, c)
	web := controlplane.Service{Name: "web", Proto: "http"}
	ssh := controlplane.Service{Name: "ssh", Proto: "tcp"}
	ka, kb := enrolled(t, s, "pi01"), enrolled(t, s, "pi02")
	_, la := connectRegister(t, s, ka, web, ssh)
	_, lb := connectRegister(t, s, kb, web, ssh)
	if la[0].Hostname != "web-pi01" || lb[0].Hostname != "web-pi02" || la[1].Port != 20000 || lb[1].Port != 20001 {
		t.Fatalf("leases: %+v %+v", la, lb)
	}
	// SERVICE-DEVICE parses one way only: device x cannot name a service
	// web-pi01 to take web-pi01-x, device pi01-x's.
	kc := enrolled(t, s, "pi01-x")
	_, lc := connectRegister(t, s, kc, web)
	kd := enrolled(t, s, "x")
	cd, err := s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: kd, RelayID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Register(t.Context(), controlplane.RegisterRequest{DeviceID: cd.DeviceID, Generation: cd.Generation,
		Services: []controlplane.Service{{Name: "web-pi01", Proto: "http"}}})
	wantKind(t, err, controlplane.KindInvalid)
	if lc[0].Hostname != "web-pi01-x" || !strings.Contains(err.Error(), "no '-'") {
		t.Fatalf("label %q; squat: %v", lc[0].Hostname, err)
	}
	// Port range exhausted: a clear error.
	_, err = s.Register(t.Context(), controlplane.RegisterRequest{DeviceID: lc[0].DeviceID, Generation: 1,
		Services: []controlplane.Service{{Name: "a", Proto: "tcp"}, {Name: "b", Proto: "tcp"}}})
	wantKind(t, err, controlplane.KindConflict)

	// Reopen the file: the same names come back to the same devices.
	s.Close()
	s = mustOpen(t, path, c)
	_, la2 := connectRegister(t, s, ka, ssh, web)
	if la2[0].Port != la[1].Port || la2[1].Hostname != la[0].Hostname {
		t.Fatalf("leases not sticky: before %+v after %+v", la, la2)
	}
	l, err := s.Lookup(t.Context(), controlplane.LookupRequest{Hostname: "web-pi01"})
	if err != nil || l.DeviceName != "pi01" || !l.Online || l.Relay != "r1" {
		t.Fatalf("lookup: %v %+v", err, l)
	}
	_, err = s.Lookup(t.Context(), controlplane.LookupRequest{Hostname: "nope"})
	wantKind(t, err, controlplane.KindNotFound)
	all, _ := s.Leases(t.Context())
	if len(all) != 5 {
		t.Fatalf("got %d leases", len(all))
	}
}

// TestLegacyServiceNameKeepsItsLease: a service name with '-' that holds
// a lease from an older release keeps it; a new one is refused.
func TestLegacyServiceNameKeepsItsLease(t *testing.T) {
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), newClock())
	k := enrolled(t, s, "pi01")
	cr, _ := connectRegister(t, s, k)
	old := controlplane.Lease{Hostname: "my-web-pi01", DeviceID: cr.DeviceID, DeviceName: "pi01", Service: "my-web", Proto: "http"}
	err := s.db.Update(func(tx *bolt.Tx) error { // as an older release wrote it
		key := []byte(cr.DeviceID + "/my-web")
		if err := tx.Bucket(bucketHostnames).Put([]byte(old.Hostname), key); err != nil {
			return err
		}
		return putJSON(tx.Bucket(bucketLeases), key, old)
	})
	if err != nil {
		t.Fatal(err)
	}
	_, ls := connectRegister(t, s, k, controlplane.Service{Name: "my-web", Proto: "http"}, controlplane.Service{Name: "web", Proto: "http"})
	if ls[0].Hostname != "my-web-pi01" || ls[1].Hostname != "web-pi01" {
		t.Fatalf("leases after the upgrade: %+v", ls)
	}
	cr, err = s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Register(t.Context(), controlplane.RegisterRequest{DeviceID: cr.DeviceID, Generation: cr.Generation,
		Services: []controlplane.Service{{Name: "my-web", Proto: "http"}, {Name: "new-one", Proto: "http"}}})
	wantKind(t, err, controlplane.KindInvalid)
}

func TestSessionsGenerationsAndRevoke(t *testing.T) {
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), newClock())
	ctx := t.Context()
	k := enrolled(t, s, "pi01")
	c1, _ := connectRegister(t, s, k)
	c2, _ := connectRegister(t, s, k)
	if c2.Generation != c1.Generation+1 {
		t.Fatalf("generations %d then %d", c1.Generation, c2.Generation)
	}
	// The older session cannot register or disconnect the newer one.
	_, err := s.Register(ctx, controlplane.RegisterRequest{DeviceID: c1.DeviceID, Generation: c1.Generation})
	wantKind(t, err, controlplane.KindConflict)
	s.Disconnect(ctx, controlplane.DisconnectRequest{DeviceID: c1.DeviceID, Generation: c1.Generation})
	if d, _ := s.Device(ctx, "pi01"); !d.Online {
		t.Fatal("stale disconnect took the new session offline")
	}
	if err := s.ResetRelay(ctx, "r1"); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Device(ctx, "pi01"); d.Online {
		t.Fatal("ResetRelay left the device online")
	}
	_, err = s.Connect(ctx, controlplane.ConnectRequest{PublicKey: key(t), RelayID: "r1"})
	wantKind(t, err, controlplane.KindUnauthorized)
	if _, err := s.Revoke(ctx, "pi01"); err != nil {
		t.Fatal(err)
	}
	_, err = s.Connect(ctx, controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"})
	wantKind(t, err, controlplane.KindRevoked)
	_, err = s.Revoke(ctx, "nobody")
	wantKind(t, err, controlplane.KindNotFound)
}

func TestClonedKeyDetected(t *testing.T) {
	c := newClock()
	s := mustOpen(t, filepath.Join(t.TempDir(), "cp.db"), c)
	k := enrolled(t, s, "pi01")
	var err error
	for i := 0; i < 10 && err == nil; i++ {
		c.Add(2 * time.Second) // two agents taking over from each other every 2 s
		_, err = s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"})
	}
	wantKind(t, err, controlplane.KindConflict)
	if d, _ := s.Device(t.Context(), "pi01"); !d.CloneSuspected {
		t.Fatal("clone not reported on the device")
	}
	// A device that reconnects after its old session really ended is fine.
	d, _ := s.Device(t.Context(), "pi01")
	s.Disconnect(t.Context(), controlplane.DisconnectRequest{DeviceID: d.ID, Generation: d.Generation})
	if _, err := s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"}); err != nil {
		t.Fatal(err)
	}
}

func TestSecondOpenFailsFastWithClearError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cp.db")
	mustOpen(t, path, newClock())
	start := time.Now()
	_, err := Open(Config{Path: path})
	if err == nil || !strings.Contains(err.Error(), "locked by another process") {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("second open took %v", d)
	}
}

// TestKill9WhileWriting kills a child process that writes leases as fast as
// it can, then checks the file opens cleanly with every acknowledged write.
func TestKill9WhileWriting(t *testing.T) {
	if os.Getenv("BOLTSTORE_CHILD") != "" {
		childWriter(os.Getenv("BOLTSTORE_CHILD"))
		return
	}
	path := filepath.Join(t.TempDir(), "cp.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKill9WhileWriting$")
	cmd.Env = append(os.Environ(), "BOLTSTORE_CHILD="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	acked := 0
	for sc.Scan() && acked < 150 {
		if n, err := strconv.Atoi(strings.TrimPrefix(sc.Text(), "acked ")); err == nil {
			acked = n
		}
	}
	cmd.Process.Kill() // SIGKILL while it keeps writing
	cmd.Wait()
	if acked < 150 {
		t.Fatalf("child acknowledged only %d writes", acked)
	}
	s, err := Open(Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Check(); err != nil {
		t.Fatalf("consistency check: %v", err)
	}
	devices, err := s.Devices(context.Background())
	if err != nil || len(devices) < acked {
		t.Fatalf("%d devices after %d acknowledged enrollments: %v", len(devices), acked, err)
	}
	leases, _ := s.Leases(context.Background())
	for _, l := range leases {
		if l.Hostname != "web-"+l.DeviceName {
			t.Fatalf("lease %+v does not match its device", l)
		}
	}
}

func childWriter(path string) {
	s, err := Open(Config{Path: path})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	tok, _, _ := s.CreateToken(ctx, 1<<30, time.Hour, nil)
	for i := 1; ; i++ {
		k, _, _ := ed25519.GenerateKey(nil)
		r, err := s.Enroll(ctx, controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: k, Name: fmt.Sprintf("dev%d", i)}})
		if err != nil {
			panic(err)
		}
		cr, err := s.Connect(ctx, controlplane.ConnectRequest{PublicKey: k, RelayID: "r"})
		if err != nil {
			panic(err)
		}
		if _, err := s.Register(ctx, controlplane.RegisterRequest{DeviceID: r.DeviceID, Generation: cr.Generation,
			Services: []controlplane.Service{{Name: "web", Proto: "http"}}}); err != nil {
			panic(err)
		}
		fmt.Printf("acked %d\n", i)
	}
}

// TestLeaseQuotaAndQuarantine: re-registering is idempotent; a device
// cannot take more than MaxServices leases by renaming its services; a
// lease in use is not released; a released name and port sit in
// quarantine, then are leased again.
func TestLeaseQuotaAndQuarantine(t *testing.T) {
	c := newClock()
	s, err := Open(Config{Path: filepath.Join(t.TempDir(), "cp.db"), Now: c.Now, MaxServices: 3, Quarantine: time.Hour,
		TCPPorts: controlplane.PortRange{First: 20000, Last: 20002}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	register := func(k ed25519.PublicKey, svcs ...controlplane.Service) ([]controlplane.Lease, error) {
		t.Helper()
		c.Add(time.Minute) // a new session, not a clone's takeover
		cr, err := s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: k, RelayID: "r1"})
		if err != nil {
			t.Fatal(err)
		}
		return s.Register(t.Context(), controlplane.RegisterRequest{DeviceID: cr.DeviceID, Generation: cr.Generation, Services: svcs})
	}
	tcp := func(name string) controlplane.Service { return controlplane.Service{Name: name, Proto: "tcp"} }
	k := enrolled(t, s, "pi01")
	web := controlplane.Service{Name: "web", Proto: "http"}
	first, err := register(k, web, tcp("ssh"))
	if err != nil {
		t.Fatal(err)
	}
	for range 5 { // idempotent
		if again, err := register(k, web, tcp("ssh")); err != nil || again[0].Hostname != first[0].Hostname || again[1].Port != first[1].Port {
			t.Fatalf("re-register: %+v %v, first %+v", again, err, first)
		}
	}
	if _, err := register(k, tcp("a")); err != nil {
		t.Fatalf("third lease: %v", err)
	}
	_, err = register(k, tcp("b"))
	wantKind(t, err, controlplane.KindInvalid)
	if !strings.Contains(err.Error(), "at most 3") {
		t.Fatalf("over quota: %v", err)
	}
	if all, _ := s.Leases(t.Context()); len(all) != 3 {
		t.Fatalf("%d leases after the refusal, want 3", len(all))
	}
	_, err = register(k, tcp("a"), tcp("b"), tcp("c"), tcp("d"))
	wantKind(t, err, controlplane.KindInvalid)

	// a is registered by the online session: in use. web and ssh are not.
	if _, err := register(k, tcp("a")); err != nil {
		t.Fatal(err)
	}
	_, err = s.ReleaseLease(t.Context(), "20001")
	wantKind(t, err, controlplane.KindConflict)
	_, err = s.ReleaseLease(t.Context(), "nope")
	wantKind(t, err, controlplane.KindNotFound)
	if l, err := s.ReleaseLease(t.Context(), "web-pi01"); err != nil || l.Service != "web" {
		t.Fatalf("release web-pi01: %+v %v", l, err)
	}
	if l, err := s.ReleaseLease(t.Context(), "20000"); err != nil || l.Service != "ssh" {
		t.Fatalf("release 20000: %+v %v", l, err)
	}
	// In quarantine: nobody gets them, the device that held them neither.
	ls, err := register(k, tcp("a"), web)
	if err != nil || ls[1].Hostname != "web-pi01--2" {
		t.Fatalf("web again during the quarantine: %+v %v", ls, err)
	}
	k2, k3 := enrolled(t, s, "pi02"), enrolled(t, s, "pi03")
	if ls, err := register(k2, tcp("ssh")); err != nil || ls[0].Port != 20002 {
		t.Fatalf("pi02's port during the quarantine: %+v %v", ls, err)
	}
	_, err = register(k3, tcp("ssh"))
	wantKind(t, err, controlplane.KindConflict) // 20000 quarantined, 20001-20002 leased
	c.Add(2 * time.Hour)
	if ls, err := register(k3, tcp("ssh")); err != nil || ls[0].Port != 20000 {
		t.Fatalf("after the quarantine: %+v %v", ls, err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestDeleteAndReplace: a device is deleted only once revoked, and its
// names go into quarantine; a replacement device takes a revoked one's
// name, labels and leases, and the old key stays refused.
func TestDeleteAndReplace(t *testing.T) {
	c := newClock()
	s, err := Open(Config{Path: filepath.Join(t.TempDir(), "cp.db"), Now: c.Now, Quarantine: time.Hour,
		TCPPorts: controlplane.PortRange{First: 20000, Last: 20009}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	web, ssh := controlplane.Service{Name: "web", Proto: "http"}, controlplane.Service{Name: "ssh", Proto: "tcp"}
	oldKey := enrolled(t, s, "pi01")
	_, before := connectRegister(t, s, oldKey, web, ssh)

	// Replace: only a revoked device.
	_, _, err = s.CreateReplaceToken(t.Context(), "pi01", time.Hour)
	wantKind(t, err, controlplane.KindConflict)
	if _, err := s.Revoke(t.Context(), "pi01"); err != nil {
		t.Fatal(err)
	}
	tok, _, err := s.CreateReplaceToken(t.Context(), "pi01", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	newKey := key(t)
	resp, err := s.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok),
		EnrollDevice: frames.EnrollDevice{PublicKey: newKey, Name: "other", NameIsDefault: true}})
	if err != nil || resp.Name != "pi01" || resp.DeviceID != frames.DeviceID(newKey) {
		t.Fatalf("enroll the replacement: %+v %v", resp, err)
	}
	c.Add(time.Minute)
	_, after := connectRegister(t, s, newKey, web, ssh)
	if after[0].Hostname != before[0].Hostname || after[1].Port != before[1].Port || after[0].DeviceID != resp.DeviceID {
		t.Fatalf("leases after the replacement %+v, before %+v", after, before)
	}
	d, _ := s.Device(t.Context(), "pi01")
	if d.Replaced != frames.DeviceID(oldKey) || d.Labels["site"] != "lab" {
		t.Fatalf("replacement device: %+v", d)
	}
	_, err = s.Connect(t.Context(), controlplane.ConnectRequest{PublicKey: oldKey, RelayID: "r1"})
	wantKind(t, err, controlplane.KindUnauthorized) // the old key is gone
	// The token was for one replacement.
	_, err = s.Enroll(t.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(tok), EnrollDevice: frames.EnrollDevice{PublicKey: key(t), Name: "x"}})
	wantKind(t, err, controlplane.KindUnauthorized)

	// Delete: only a revoked device; its names go into quarantine.
	_, _, err = s.DeleteDevice(t.Context(), "pi01", false)
	wantKind(t, err, controlplane.KindConflict)
	s.Revoke(t.Context(), "pi01")
	gone, leases, err := s.DeleteDevice(t.Context(), "pi01", false)
	if err != nil || gone.Name != "pi01" || len(leases) != 2 {
		t.Fatalf("delete: %+v %+v %v", gone, leases, err)
	}
	if all, _ := s.Leases(t.Context()); len(all) != 0 {
		t.Fatalf("leases left: %+v", all)
	}
	k3 := enrolled(t, s, "pi01") // the name is free again, its hostname not yet
	_, l3 := connectRegister(t, s, k3, web, ssh)
	if l3[0].Hostname != "web-pi01--2" || l3[1].Port == before[1].Port {
		t.Fatalf("during the quarantine: %+v", l3)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}
