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
	Addr     string        `split_words:"true" default:":8080" desc:"listen address"`
	Interval time.Duration `envconfig:"INTERVAL" default:"15s" desc:"period"`
	Name     string        `envconfig:"NAME" required:"true" desc:"a name"`
	Uses     int           `envconfig:"USES" default:"1"`
	Debug    bool          `envconfig:"DEBUG"`
	RelayURL string        `split_words:"true" desc:"split words with an acronym"`
}

// cleanEnv removes the TETHER_* variables of the test process's
// environment for one test.
func cleanEnv(t *testing.T) {
	for _, kv := range os.Environ() {
		if k, v, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "TETHER_") {
			t.Setenv(k, v)
			os.Unsetenv(k)
		}
	}
}

func TestParse(t *testing.T) {
	cleanEnv(t)
	t.Setenv("TETHER_NAME", "from-env")
	t.Setenv("TETHER_INTERVAL", "1m")
	t.Setenv("TETHER_RELAY_URL", "wss://r")
	var s testSpec
	unknown, err := Parse("x", "v1", "about", &s, []string{"--addr=:9", "--uses", "3", "-debug"}, nil)
	if err != nil || unknown != nil {
		t.Fatal(err, unknown)
	}
	want := testSpec{Addr: ":9", Interval: time.Minute, Name: "from-env", Uses: 3, Debug: true, RelayURL: "wss://r"}
	if s != want {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	// A flag wins over the environment, which stays as it was.
	if _, err := Parse("x", "v1", "about", &s, []string{"--name", "from-flag", "--debug=false"}, nil); err != nil || s.Name != "from-flag" || s.Debug {
		t.Fatalf("flag over env: %+v %v", s, err)
	}
	if os.Getenv("TETHER_NAME") != "from-env" || os.Getenv("TETHER_ADDR") != "" {
		t.Fatal("Parse changed the process environment")
	}
	// A required setting may come from its flag alone.
	os.Unsetenv("TETHER_NAME")
	if _, err := Parse("x", "v1", "about", &s, []string{"--name=n"}, nil); err != nil || s.Name != "n" {
		t.Fatalf("required from flag: %+v %v", s, err)
	}
}

func TestUnknownVariablesAreWarnedAbout(t *testing.T) {
	cleanEnv(t)
	t.Setenv("TETHER_NAME", "a")
	t.Setenv("TETHER_NAEM", "typo")
	t.Setenv("TETHER_RELAY_SERVICE_HOST", "10.0.0.1") // a Kubernetes service link
	t.Setenv("TETHER_ADMIN_URL", "http://cp")         // a setting of another binary: no warning
	var s testSpec
	unknown, err := Parse("x", "v1", "about", &s, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, u := range unknown {
		got[u.Var] = u.Closest
	}
	want := map[string]string{"TETHER_NAEM": "TETHER_NAME", "TETHER_RELAY_SERVICE_HOST": "TETHER_RELAY_URL"}
	if len(got) != len(want) || got["TETHER_NAEM"] != want["TETHER_NAEM"] || got["TETHER_RELAY_SERVICE_HOST"] != want["TETHER_RELAY_SERVICE_HOST"] {
		t.Fatalf("unknown = %v, want %v", got, want)
	}
	if u := unknown[0].String(); !strings.Contains(u, "closest known") {
		t.Fatalf("%q", u)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name string
		env  map[string]string
		args []string
		says string
	}{
		{"required missing", nil, nil, "TETHER_NAME is not set (or pass --name)"},
		{"bad duration", map[string]string{"TETHER_NAME": "a", "TETHER_INTERVAL": "soon"}, nil, `TETHER_INTERVAL="soon"`},
		{"bad int flag", map[string]string{"TETHER_NAME": "a"}, []string{"--uses=x"}, `--uses="x"`},
		{"bad bool flag", map[string]string{"TETHER_NAME": "a"}, []string{"--debug=maybe"}, `--debug="maybe"`},
		{"unknown flag", map[string]string{"TETHER_NAME": "a"}, []string{"--nope=1"}, "unknown flag --nope=1"},
		{"flag without value", map[string]string{"TETHER_NAME": "a"}, []string{"--addr"}, "needs a value"},
		{"argument", map[string]string{"TETHER_NAME": "a"}, []string{"extra"}, `unexpected argument "extra"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cleanEnv(t)
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			var s testSpec
			_, err := Parse("x", "v1", "about", &s, c.args, nil)
			if err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), "x --help") {
				t.Fatalf("got %v, want an error saying %s", err, c.says)
			}
		})
	}
}

func TestHelpAndVersion(t *testing.T) {
	var out bytes.Buffer
	var s testSpec
	if _, err := Parse("x", "v1", "About x.", &s, []string{"--help"}, &out); !errors.Is(err, ErrHelp) {
		t.Fatal(err)
	}
	for _, want := range []string{"About x.", "--interval", "TETHER_INTERVAL", "15s", "(required)", "listen address", "--version", "--relay-url", "TETHER_RELAY_URL", "TETHER_ADDR"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if _, err := Parse("x", "v1.2.3", "", &s, []string{"--version"}, &out); !errors.Is(err, ErrHelp) || !strings.HasPrefix(out.String(), "x v1.2.3 ") {
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

func TestNamesAreEnvconfigs(t *testing.T) {
	type shapes struct {
		RelayURL       string `split_words:"true"`
		HTTPSAddr      string `split_words:"true"`
		TLSCert        string `split_words:"true"`
		AdminTokenFile string `split_words:"true"`
		NATSURL        string `envconfig:"NATS_URL"`
		Domain         string `split_words:"true"`
		Plain          string
		Ignored        string `ignored:"true"`
		X509Cert       string `split_words:"true"`
	}
	for _, spec := range []any{&testSpec{}, &shapes{}} {
		if _, err := envconfigNames(spec); err != nil {
			t.Error(err)
		}
	}
}

// TestNoUnprefixedFallback: envconfig reads NATS_URL for a field tagged
// envconfig:"NATS_URL" when TETHER_NATS_URL is unset; that variable belongs
// to other programs (the nats CLI) and must not switch a relay to cluster
// mode.
func TestNoUnprefixedFallback(t *testing.T) {
	cleanEnv(t)
	t.Setenv("NATS_URL", "nats://elsewhere:4222")
	var s struct {
		NATSURL string `envconfig:"NATS_URL" desc:"external NATS"`
	}
	if _, err := Parse("x", "v1", "about", &s, nil, nil); err != nil || s.NATSURL != "" {
		t.Fatalf("NATSURL = %q (%v), want empty", s.NATSURL, err)
	}
	t.Setenv("TETHER_NATS_URL", "nats://here:4222")
	if _, err := Parse("x", "v1", "about", &s, nil, nil); err != nil || s.NATSURL != "nats://here:4222" {
		t.Fatalf("NATSURL = %q (%v)", s.NATSURL, err)
	}
}
