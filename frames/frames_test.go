package frames

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.hex golden files")

// samples has one populated value of every message type; the golden files
// in testdata pin their encoding.
func samples() map[string]Message {
	var key [32]byte
	var sig [64]byte
	for i := range key {
		key[i] = byte(i)
	}
	for i := range sig {
		sig[i] = byte(255 - i)
	}
	return map[string]Message{
		"hello":         &Hello{PublicKey: key, AgentVersion: "v1.2.3", HeartbeatMillis: 15000},
		"challenge":     &Challenge{Nonce: key, RelayID: "relay-a"},
		"auth":          &Auth{Signature: sig},
		"welcome":       &Welcome{DeviceID: "dabc", DeviceName: "pi01", Generation: 7, HeartbeatMillis: 15000},
		"register":      &Register{Services: []Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp"}}},
		"register-idle": &Register{Services: []Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp", IdleSeconds: 600}}},
		"leases":        &Leases{Leases: []Lease{{"web", "http", "web-pi01.example.com", 0}, {"ssh", "tcp", "", 20001}}},
		"heartbeat":     &Heartbeat{Seq: 42, ActiveStreams: 3, TotalStreams: 99},
		"heartbeat-ack": &HeartbeatAck{Seq: 42},
		"drain":         &Drain{Reason: "relay shutting down", WithinMillis: 30000},
		"error":         &Error{Code: CodeRevoked, Message: "device revoked"},
		"stream-open":   &StreamOpen{Service: "web", ClientAddr: "203.0.113.9:51234"},
		"stream-accept": &StreamAccept{},
		"stream-refuse": &StreamRefuse{Code: CodeDialFailed, Message: "dial tcp 127.0.0.1:3000: connection refused"},
		"peer-open":     &PeerOpen{DeviceID: "dk3vq7x2m4n5p6r7s", Service: "web", ClientAddr: "[2001:db8::9]:51234"},
		"update-offer":  &UpdateOffer{Version: "v1.4.0", Manifest: []byte(`{"version":"v1.4.0"}`), Signature: []byte("untrusted comment: x\nRWQ=\n")},
		"update-status": &UpdateStatus{Version: "v1.4.0", State: UpdateRolledBack, Reason: "no heartbeat within 2m0s"},
		"fetch":         &Fetch{Version: "v1.4.0", Arch: "armv7", Offset: 1 << 20},
	}
}

func TestGolden(t *testing.T) {
	for name, m := range samples() {
		t.Run(name, func(t *testing.T) {
			got := Append(nil, m)
			path := filepath.Join("testdata", name+".hex")
			if *update {
				if err := os.WriteFile(path, []byte(hex.Dump(got)), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read golden file (run go test -update to create): %v", err)
			}
			if hex.Dump(got) != string(want) {
				t.Errorf("encoding changed:\ngot:\n%s\nwant:\n%s", hex.Dump(got), want)
			}
			back, err := Read(bytes.NewReader(got), 0)
			if err != nil {
				t.Fatalf("read back: %v", err)
			}
			if !reflect.DeepEqual(back, m) {
				t.Errorf("round trip: got %#v, want %#v", back, m)
			}
		})
	}
}

// TestFrozenConstants pins the values on the wire: they must never change.
func TestFrozenConstants(t *testing.T) {
	frozen := map[Type]uint8{
		TypeHello: 1, TypeChallenge: 2, TypeAuth: 3, TypeWelcome: 4, TypeRegister: 5,
		TypeLeases: 6, TypeHeartbeat: 7, TypeHeartbeatAck: 8, TypeDrain: 9, TypeError: 10,
		TypeStreamOpen: 32, TypeStreamAccept: 33, TypeStreamRefuse: 34, TypePeerOpen: 35,
		TypeUpdateOffer: 11, TypeUpdateStatus: 12, TypeFetch: 36,
	}
	for typ, v := range frozen {
		if uint8(typ) != v {
			t.Errorf("%v = %d, frozen at %d", typ, uint8(typ), v)
		}
	}
	if CodeDialFailed != 10 || CodeRevoked != 3 || CodeNotHere != 11 || Subprotocol != "tether.v1" || HeaderLen != 5 {
		t.Error("a frozen constant changed")
	}
}

func TestParseHeaderLiteral(t *testing.T) {
	h := [HeaderLen]byte{0x07, 0x00, 0x01, 0x00, 0x02}
	typ, n := ParseHeader(h)
	if typ != TypeHeartbeat || n != 0x10002 {
		t.Fatalf("got %v %d", typ, n)
	}
	if a := testing.AllocsPerRun(100, func() { ParseHeader(h) }); a != 0 {
		t.Errorf("ParseHeader allocates %v times", a)
	}
}

func TestReadRejectsOversizeBeforeAllocating(t *testing.T) {
	// Declares 4 GiB; a reader that allocated first would die here.
	r := bytes.NewReader([]byte{byte(TypeRegister), 0xff, 0xff, 0xff, 0xff})
	_, err := Read(r, 0)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
	// A custom limit below MaxPayload applies too.
	b := Append(nil, &Drain{Reason: strings.Repeat("x", 100)})
	if _, err := Read(bytes.NewReader(b), 50); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("limit 50: got %v", err)
	}
}

func TestReadErrors(t *testing.T) {
	cases := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.EOF},
		{"short header", []byte{1, 0}, io.ErrUnexpectedEOF},
		{"short payload", []byte{byte(TypeHeartbeatAck), 0, 0, 0, 8, 1, 2}, io.ErrUnexpectedEOF},
		{"field missing", []byte{byte(TypeHeartbeatAck), 0, 0, 0, 2, 1, 2}, ErrShort},
		{"string too long", append([]byte{byte(TypeStreamOpen), 0, 0, 0, 2}, 0xff, 0xff), ErrInvalid},
		{"too many services", append([]byte{byte(TypeRegister), 0, 0, 0, 2}, 0x01, 0x00), ErrInvalid},
		// One service, "a" over "tcp", then idle seconds for two.
		{"idle timeouts for another number of services", []byte{byte(TypeRegister), 0, 0, 0, 18,
			0, 1, 0, 1, 'a', 0, 3, 't', 'c', 'p', 0, 2, 0, 0, 0, 10, 0, 0}, ErrInvalid},
		{"idle timeouts cut short", []byte{byte(TypeRegister), 0, 0, 0, 14,
			0, 1, 0, 1, 'a', 0, 3, 't', 'c', 'p', 0, 1, 0, 0}, ErrShort},
		{"peer-open without client address", []byte{byte(TypePeerOpen), 0, 0, 0, 5, 0, 1, 'd', 0, 0}, ErrShort},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Read(bytes.NewReader(c.in), 0)
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
}

func TestUnknownTypeSkippedAndTrailingBytesIgnored(t *testing.T) {
	var buf bytes.Buffer
	buf.Write([]byte{200, 0, 0, 0, 3, 'a', 'b', 'c'}) // a future message
	ack := Append(nil, &HeartbeatAck{Seq: 9})
	ack = append(ack, 0xEE, 0xEE) // a future field
	ack[4] += 2                   // ...counted in the length
	buf.Write(ack)
	m, err := Read(&buf, 0)
	if err != nil {
		t.Fatal(err)
	}
	if u, ok := m.(*Unknown); !ok || u.T != 200 || string(u.Payload) != "abc" {
		t.Fatalf("got %#v", m)
	}
	m, err = Read(&buf, 0)
	if err != nil {
		t.Fatal(err)
	}
	if a, ok := m.(*HeartbeatAck); !ok || a.Seq != 9 {
		t.Fatalf("got %#v", m)
	}
}

func TestWriteRefusesOversize(t *testing.T) {
	m := &Unknown{T: 99, Payload: make([]byte, MaxPayload+1)}
	if err := Write(io.Discard, m); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v", err)
	}
}

func TestAuthSignature(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	var pk [32]byte
	copy(pk[:], pub)
	nonce := [32]byte{1, 2, 3}
	var sig [64]byte
	copy(sig[:], ed25519.Sign(priv, AuthMessage(nonce, pk, "relay-a")))
	if !VerifyAuth(pk, nonce, "relay-a", sig) {
		t.Fatal("valid signature refused")
	}
	if VerifyAuth(pk, [32]byte{9}, "relay-a", sig) {
		t.Fatal("signature replayed under another nonce accepted")
	}
	if VerifyAuth(pk, nonce, "relay-b", sig) {
		t.Fatal("signature for another relay accepted")
	}
	id := DeviceID(pub)
	if len(id) != 17 || id[0] != 'd' || id != strings.ToLower(id) || id != DeviceID(pub) {
		t.Fatalf("DeviceID %q", id)
	}
}

// FuzzRead feeds arbitrary bytes, split in two pieces, to Read; whatever
// decodes must encode and decode to the same message.
func FuzzRead(f *testing.F) {
	for _, m := range samples() {
		f.Add(Append(nil, m), uint8(3))
	}
	f.Add([]byte{byte(TypeRegister), 0, 0, 0, 0}, uint8(1))
	// A Register whose idle timeouts are all zero: it encodes without them.
	f.Add([]byte{byte(TypeRegister), 0, 0, 0, 16, 0, 1, 0, 1, 'a', 0, 3, 't', 'c', 'p', 0, 1, 0, 0, 0, 0}, uint8(5))
	f.Fuzz(func(t *testing.T, data []byte, cut uint8) {
		split := int(cut) % (len(data) + 1)
		r := io.MultiReader(bytes.NewReader(data[:split]), bytes.NewReader(data[split:]))
		m, err := Read(r, 0)
		if err != nil {
			return
		}
		again, err := Read(bytes.NewReader(Append(nil, m)), 0)
		if err != nil {
			t.Fatalf("re-read of %#v: %v", m, err)
		}
		if !reflect.DeepEqual(normalize(m), normalize(again)) {
			t.Fatalf("round trip: %#v != %#v", m, again)
		}
	})
}

// normalize maps nil and empty slices together for comparison.
func normalize(m Message) Message {
	switch v := m.(type) {
	case *Register:
		if len(v.Services) == 0 {
			return &Register{}
		}
	case *Leases:
		if len(v.Leases) == 0 {
			return &Leases{}
		}
	case *Unknown:
		if len(v.Payload) == 0 {
			return &Unknown{T: v.T}
		}
	}
	return m
}

func TestReadAs(t *testing.T) {
	var buf bytes.Buffer
	buf.Write(Append(nil, &Unknown{T: 200, Payload: []byte("x")}))
	buf.Write(Append(nil, &HeartbeatAck{Seq: 3}))
	buf.Write(Append(nil, &Error{Code: CodeRevoked, Message: "gone"}))
	buf.Write(Append(nil, &Drain{}))
	if ack, err := ReadAs[*HeartbeatAck](&buf, 0); err != nil || ack.Seq != 3 {
		t.Fatalf("skipping unknown frames: %v %v", ack, err)
	}
	var fe *Error
	if _, err := ReadAs[*HeartbeatAck](&buf, 0); !errors.As(err, &fe) || fe.Code != CodeRevoked {
		t.Fatalf("peer error: %v", err)
	}
	if _, err := ReadAs[*HeartbeatAck](&buf, 0); err == nil || !strings.Contains(err.Error(), "unexpected drain frame") {
		t.Fatalf("wrong type: %v", err)
	}
}

// TestWelcomeWithoutHeartbeat: a welcome from a relay that predates the
// heartbeat field still reads, with the field zero.
func TestWelcomeWithoutHeartbeat(t *testing.T) {
	full := Append(nil, &Welcome{DeviceID: "dabc", DeviceName: "pi01", Generation: 7, HeartbeatMillis: 15000})
	old := append([]byte(nil), full[:len(full)-4]...)
	old[4] -= 4 // the payload length (< 256 here)
	m, err := Read(bytes.NewReader(old), 0)
	if w, ok := m.(*Welcome); err != nil || !ok || w.Generation != 7 || w.HeartbeatMillis != 0 {
		t.Fatalf("old welcome: %#v %v", m, err)
	}
}

// TestRegisterIdleSeconds: the services' idle timeouts follow the list
// only when one is asked for, so a Register that asks none is byte for
// byte an older agent's; an older agent's Register reads with none; and an
// older relay, which stops after the list, reads the services alone.
func TestRegisterIdleSeconds(t *testing.T) {
	none := &Register{Services: []Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp"}}}
	golden, err := os.ReadFile(filepath.Join("testdata", "register.hex"))
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.Dump(Append(nil, none)); got != string(golden) {
		t.Fatalf("a register asking no idle timeout changed its encoding:\n%s", got)
	}

	// The agent of before the field: its register, written by hand.
	old := []byte{byte(TypeRegister), 0, 0, 0, 23, 0, 2, 0, 3, 'w', 'e', 'b', 0, 4, 'h', 't', 't', 'p', 0, 3, 's', 's', 'h', 0, 3, 't', 'c', 'p'}
	m, err := Read(bytes.NewReader(old), 0)
	if err != nil || !reflect.DeepEqual(m, none) {
		t.Fatalf("an older agent's register: %#v %v", m, err)
	}

	asks := &Register{Services: []Service{{Name: "web", Proto: "http"}, {Name: "ssh", Proto: "tcp", IdleSeconds: 600}}}
	b := Append(nil, asks)
	if want := len(old) + 2 + 2*4; len(b) != want {
		t.Fatalf("register with idle timeouts is %d bytes, want %d", len(b), want)
	}
	if !bytes.Equal(b[len(old):], []byte{0, 2, 0, 0, 0, 0, 0, 0, 0x02, 0x58}) {
		t.Fatalf("idle timeouts encoded as % x", b[len(old):])
	}
	// An older relay reads the list and ignores what follows: the same
	// services, as this decoder reads them without the idle timeouts.
	var older Register
	d := decoder{p: b[HeaderLen:]}
	for range d.count(MaxServices) {
		older.Services = append(older.Services, Service{Name: d.string(), Proto: d.string()})
	}
	if d.err != nil || !reflect.DeepEqual(&older, none) {
		t.Fatalf("an older relay reads %#v, %v", older, d.err)
	}
	m, err = Read(bytes.NewReader(b), 0)
	if err != nil || !reflect.DeepEqual(m, asks) {
		t.Fatalf("read back: %#v %v", m, err)
	}
}
