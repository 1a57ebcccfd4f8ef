package cli

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

type testSpec struct {
	Addr     string        `envconfig:"ADDR" default:":8080" desc:"listen address"`
	Interval time.Duration `envconfig:"INTERVAL" default:"15s" desc:"period"`
	Name     string        `envconfig:"NAME" required:"true" desc:"a name"`
	Uses     int           `envconfig:"USES" default:"1"`
	Debug    bool          `envconfig:"DEBUG"`
}

func TestParse(t *testing.T) {
	t.Setenv("TETHER_NAME", "from-env")
	t.Setenv("TETHER_INTERVAL", "1m")
	var s testSpec
	if err := Parse("x", "v1", "about", &s, []string{"--addr=:9", "--uses", "3", "-debug", "true"}, true, nil); err != nil {
		t.Fatal(err)
	}
	want := testSpec{Addr: ":9", Interval: time.Minute, Name: "from-env", Uses: 3, Debug: true}
	if s != want {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	// A flag wins over the environment.
	if err := Parse("x", "v1", "about", &s, []string{"--name", "from-flag"}, true, nil); err != nil || s.Name != "from-flag" {
		t.Fatalf("flag over env: %+v %v", s, err)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		env  map[string]string
		args []string
		says string
	}{
		{"required missing", nil, nil, "TETHER_NAME is not set"},
		{"typo in a variable", map[string]string{"TETHER_NAME": "a", "TETHER_NAEM": "b"}, nil, "unknown environment variable TETHER_NAEM"},
		{"bad duration", map[string]string{"TETHER_NAME": "a", "TETHER_INTERVAL": "soon"}, nil, `TETHER_INTERVAL="soon"`},
		{"bad int", map[string]string{"TETHER_NAME": "a"}, []string{"--uses=x"}, `TETHER_USES="x"`},
		{"unknown flag", map[string]string{"TETHER_NAME": "a"}, []string{"--nope=1"}, "unknown flag --nope=1"},
		{"flag without value", map[string]string{"TETHER_NAME": "a"}, []string{"--addr"}, "needs a value"},
		{"argument", map[string]string{"TETHER_NAME": "a"}, []string{"extra"}, `unexpected argument "extra"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			var s testSpec
			err := Parse("x", "v1", "about", &s, c.args, true, nil)
			if err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), "x --help") {
				t.Fatalf("got %v, want an error saying %s", err, c.says)
			}
		})
	}
}

func TestHelpAndVersion(t *testing.T) {
	var out bytes.Buffer
	var s testSpec
	if err := Parse("x", "v1", "About x.", &s, []string{"--help"}, true, &out); !errors.Is(err, ErrHelp) {
		t.Fatal(err)
	}
	for _, want := range []string{"About x.", "--interval", "TETHER_INTERVAL", "15s", "(required)", "listen address", "--version"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := Parse("x", "v1.2.3", "", &s, []string{"--version"}, true, &out); !errors.Is(err, ErrHelp) || !strings.HasPrefix(out.String(), "x v1.2.3 ") {
		t.Fatalf("%v %q", err, out.String())
	}
}

func TestSecretFromFile(t *testing.T) {
	f := t.TempDir() + "/token"
	if _, err := Secret("", f); err == nil {
		t.Fatal("missing file: no error")
	}
	writeFile(t, f, "s3cret\n")
	if v, err := Secret("", f); err != nil || v != "s3cret" {
		t.Fatalf("%q %v", v, err)
	}
	if v, _ := Secret("given", f); v != "given" {
		t.Fatalf("value should win: %q", v)
	}
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}
