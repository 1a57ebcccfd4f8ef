package bootenv

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const card = "\xef\xbb\xbf# written by tetherctl provision\r\n" +
	"TETHER_RELAY_URL=wss://relay.example.com\r\n" +
	"TETHER_ENROLL_TOKEN=\"tth_secret0123\"\r\n" +
	"\r\n" +
	"TETHER_SERVICES='web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22'\r\n" +
	"export TETHER_DEVICE_NAME=pi01\r\n"

func TestParse(t *testing.T) {
	got, err := Parse([]byte(card))
	if err != nil {
		t.Fatal(err)
	}
	want := []Setting{
		{"TETHER_RELAY_URL", "wss://relay.example.com"},
		{"TETHER_ENROLL_TOKEN", "tth_secret0123"},
		{"TETHER_SERVICES", "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22"},
		{"TETHER_DEVICE_NAME", "pi01"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("setting %d: %q, want %q", i, got[i], want[i])
		}
	}
}

func TestParseRefuses(t *testing.T) {
	for name, in := range map[string]string{
		"empty":        "# nothing\n",
		"no equals":    "TETHER_RELAY_URL\n",
		"unknown key":  "TETHER_STATE_DIR=/tmp\n",
		"lowercase":    "tether_relay_url=wss://x\n",
		"twice":        "TETHER_DEVICE_NAME=a\nTETHER_DEVICE_NAME=b\n",
		"control char": "TETHER_DEVICE_NAME=a\x1bb\n",
		"inner quote":  "TETHER_DEVICE_NAME=a\"b\n",
		"unmatched":    "TETHER_DEVICE_NAME=\"ab\n",
		"not utf-8":    "TETHER_DEVICE_NAME=\xff\n",
		"too big":      "TETHER_DEVICE_NAME=a\n" + strings.Repeat("#", MaxSize),
		"long value":   "TETHER_SERVICES=" + strings.Repeat("a", maxValue+1) + "\n",
	} {
		if s, err := Parse([]byte(in)); err == nil {
			t.Errorf("%s: parsed as %q", name, s)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(card))
	f.Add([]byte("TETHER_RELAY_URL=wss://a\nTETHER_ENROLL_TOKEN=b"))
	f.Add([]byte("TETHER_SERVICES=''\n#\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ss, err := Parse(data)
		if err != nil {
			return
		}
		if len(data) > MaxSize || len(ss) == 0 || len(ss) > len(Keys) {
			t.Fatalf("%d bytes gave %d settings", len(data), len(ss))
		}
		// What parses is written back as KEY=VALUE and parses the same.
		var b bytes.Buffer
		for _, s := range ss {
			if strings.ContainsAny(s.Value, "\n\r\"'") {
				t.Fatalf("value %q", s.Value)
			}
			b.WriteString(s.Key + "=" + s.Value + "\n")
		}
		again, err := Parse(b.Bytes())
		if err != nil || len(again) != len(ss) {
			t.Fatalf("round trip: %v %q", err, again)
		}
		for i := range ss {
			if strings.TrimSpace(ss[i].Value) != again[i].Value || ss[i].Key != again[i].Key {
				t.Fatalf("round trip: %q != %q", ss[i], again[i])
			}
		}
	})
}

func writeCard(t *testing.T, dir, content string) string {
	t.Helper()
	p := filepath.Join(dir, FileName)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConsumeOnce(t *testing.T) {
	boot, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	other := t.TempDir()
	p := writeCard(t, boot, card)
	c := Config{BootDirs: []string{other, boot}, StateDir: state}
	res, err := Consume(c)
	if err != nil || !res.Consumed || res.Path != p || res.Left != "" {
		t.Fatalf("Consume: %+v %v", res, err)
	}
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("tether.env is still on the card: %v", err)
	}
	tok, err := os.ReadFile(filepath.Join(state, TokenFile))
	if err != nil || string(tok) != "tth_secret0123\n" {
		t.Fatalf("token file %q %v", tok, err)
	}
	for _, f := range []string{TokenFile, SettingsFile} {
		if st, err := os.Stat(filepath.Join(state, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v", f, st.Mode(), err)
		}
	}
	got, err := Load(state)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"TETHER_RELAY_URL":         "wss://relay.example.com",
		"TETHER_ENROLL_TOKEN_FILE": filepath.Join(state, TokenFile),
		"TETHER_SERVICES":          "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22",
		"TETHER_DEVICE_NAME":       "pi01",
	}
	if len(got) != len(want) {
		t.Fatalf("Load: %q", got)
	}
	for _, s := range got {
		if want[s.Key] != s.Value {
			t.Errorf("Load: %s=%q, want %q", s.Key, s.Value, want[s.Key])
		}
	}
	// A second start finds nothing.
	res, err = Consume(c)
	if err != nil || res.Path != "" || res.Consumed {
		t.Fatalf("second Consume: %+v %v", res, err)
	}
	// The same file again (a card copied back) is not consumed twice;
	// a new one is.
	writeCard(t, boot, card)
	if res, err = Consume(c); err != nil || res.Consumed {
		t.Fatalf("same file again: %+v %v", res, err)
	}
	writeCard(t, boot, "TETHER_DEVICE_NAME=pi02\n")
	if res, err = Consume(c); err != nil || !res.Consumed {
		t.Fatalf("new file: %+v %v", res, err)
	}
	if got, _ := Load(state); len(got) != 1 || got[0].Value != "pi02" {
		t.Fatalf("after the new file: %q", got)
	}
}

// TestConsumeUndeletable: when the file cannot be deleted, it is renamed
// tether.env.done without the token.
func TestConsumeUndeletable(t *testing.T) {
	boot, state := t.TempDir(), t.TempDir()
	writeCard(t, boot, card)
	c := Config{BootDirs: []string{boot}, StateDir: state, remove: func(string) error { return syscall.EPERM }}
	res, err := Consume(c)
	if err != nil || !res.Consumed || res.Left != filepath.Join(boot, DoneName) {
		t.Fatalf("Consume: %+v %v", res, err)
	}
	b, err := os.ReadFile(res.Left)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("tth_secret")) {
		t.Fatalf("the token is still on the card:\n%s", b)
	}
	if !bytes.Contains(b, []byte("# TETHER_DEVICE_NAME=pi01")) {
		t.Errorf("scrubbed file:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(boot, FileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("tether.env remains: %v", err)
	}
}

// TestConsumeReadOnly: a card that can be neither changed nor deleted is
// consumed once, and the error says the token is still on it.
func TestConsumeReadOnly(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes to a read-only directory; see TestConsumeUndeletable")
	}
	boot, state := t.TempDir(), t.TempDir()
	writeCard(t, boot, card)
	os.Chmod(filepath.Join(boot, FileName), 0o444)
	os.Chmod(boot, 0o555)
	t.Cleanup(func() { os.Chmod(boot, 0o755) })
	res, err := Consume(Config{BootDirs: []string{boot}, StateDir: state})
	if err == nil || !res.Consumed || !strings.Contains(err.Error(), "still holds the enrollment token") {
		t.Fatalf("Consume: %+v %v", res, err)
	}
	if res, err = Consume(Config{BootDirs: []string{boot}, StateDir: state}); res.Consumed {
		t.Fatalf("consumed twice: %v", err)
	}
}

func TestConsumeRefuses(t *testing.T) {
	boot, state := t.TempDir(), t.TempDir()
	p := writeCard(t, boot, "TETHER_NOPE=1\n")
	if res, err := Consume(Config{BootDirs: []string{boot}, StateDir: state}); err == nil || res.Consumed {
		t.Fatalf("bad file: %+v %v", res, err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal("a bad file was removed")
	}
	os.Remove(p)
	target := filepath.Join(t.TempDir(), "elsewhere")
	os.WriteFile(target, []byte(card), 0o644)
	os.Symlink(target, p)
	if res, err := Consume(Config{BootDirs: []string{boot}, StateDir: state}); err == nil || res.Consumed {
		t.Fatalf("symlink: %+v %v", res, err)
	}
	if _, err := Consume(Config{BootDirs: []string{boot}}); err == nil {
		t.Fatal("no state dir accepted")
	}
}
