// Package cli is the command-line surface every Tether binary shares: one
// settings struct filled from TETHER_* environment variables or the
// matching flags, --help that lists them, --version, and the slog logger.
//
// Specs use envconfig's tag vocabulary (envconfig, default, required, desc),
// but the reader is written here: kelseyhightower/envconfig links regexp,
// which alone would push the agent past its size budget (see cross). It
// carries no server dependency, so the agent can use it.
package cli

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Prefix starts every environment variable.
const Prefix = "TETHER"

// ErrHelp is returned by Parse after printing --help or --version: the
// program should exit 0.
var ErrHelp = errors.New("help shown")

// setting is one field of a spec.
type setting struct {
	env, flag, def, desc string
	required             bool
}

// settings lists spec's fields. Every field must have an envconfig tag
// naming its variable without the prefix.
func settings(spec any) []setting {
	t := reflect.TypeOf(spec).Elem()
	var out []setting
	for i := range t.NumField() {
		f := t.Field(i)
		name := f.Tag.Get("envconfig")
		if name == "" {
			panic("cli: field " + f.Name + " has no envconfig tag")
		}
		out = append(out, setting{
			env:      Prefix + "_" + name,
			flag:     strings.ReplaceAll(strings.ToLower(name), "_", "-"),
			def:      f.Tag.Get("default"),
			desc:     f.Tag.Get("desc"),
			required: f.Tag.Get("required") == "true",
		})
	}
	return out
}

// Parse fills spec (a pointer to a struct with envconfig tags) from the
// environment and from args, flags winning over variables. Unknown TETHER_*
// variables are refused when strict is set, so typos fail at startup.
// about is printed at the top of --help.
func Parse(name, version, about string, spec any, args []string, strict bool, stdout io.Writer) error {
	all := settings(spec)
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if !strings.HasPrefix(arg, "-") {
			return fmt.Errorf("unexpected argument %q (see %s --help)", arg, name)
		}
		key, val, hasVal := strings.Cut(strings.TrimLeft(arg, "-"), "=")
		switch key {
		case "h", "help":
			Usage(stdout, name, about, spec)
			return ErrHelp
		case "version":
			fmt.Fprintln(stdout, Version(name, version))
			return ErrHelp
		}
		j := slices.IndexFunc(all, func(s setting) bool { return s.flag == key })
		if j < 0 {
			return fmt.Errorf("unknown flag %s (see %s --help)", arg, name)
		}
		if !hasVal {
			if i+1 >= len(args) {
				return fmt.Errorf("flag %s needs a value (see %s --help)", arg, name)
			}
			i++
			val = args[i]
		}
		os.Setenv(all[j].env, val) // flags win over the environment
	}
	if strict {
		if err := checkDisallowed(all); err != nil {
			return fmt.Errorf("%w (see %s --help)", err, name)
		}
	}
	if err := Process(spec); err != nil {
		return fmt.Errorf("%w (see %s --help)", err, name)
	}
	return nil
}

// Process fills spec from the TETHER_* environment: a variable that is set
// (even to "") wins over the field's default; a required one must be set.
// Fields may be string, bool, int or time.Duration.
func Process(spec any) error {
	v := reflect.ValueOf(spec).Elem()
	for i, s := range settings(spec) {
		raw, ok := os.LookupEnv(s.env)
		if !ok {
			if s.required {
				return fmt.Errorf("required variable %s is not set", s.env)
			}
			raw = s.def
		}
		if err := set(v.Field(i), raw); err != nil {
			return fmt.Errorf("%s=%q: %v", s.env, raw, err)
		}
	}
	return nil
}

var durationType = reflect.TypeFor[time.Duration]()

func set(f reflect.Value, raw string) error {
	if f.Type() == durationType {
		if raw == "" {
			f.SetInt(0)
			return nil
		}
		d, err := time.ParseDuration(raw)
		f.SetInt(int64(d))
		return err
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(raw)
	case reflect.Bool:
		b, err := strconv.ParseBool(cmp.Or(raw, "false"))
		f.SetBool(b)
		return err
	case reflect.Int:
		n, err := strconv.Atoi(cmp.Or(raw, "0"))
		f.SetInt(int64(n))
		return err
	default:
		panic("cli: unsupported field type " + f.Type().String())
	}
	return nil
}

// checkDisallowed refuses TETHER_* variables the spec does not know, so
// typos fail at startup.
func checkDisallowed(all []setting) error {
	known := map[string]bool{}
	for _, s := range all {
		known[s.env] = true
	}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, Prefix+"_") && !known[k] {
			return fmt.Errorf("unknown environment variable %s", k)
		}
	}
	return nil
}

// Usage prints the settings: flag, variable, default and meaning.
func Usage(w io.Writer, name, about string, spec any) {
	fmt.Fprintf(w, "%s\n\nUsage: %s [flags]\n\nEvery setting is an environment variable or the flag beside it (the flag wins).\n\n", about, name)
	rows := [][4]string{{"FLAG", "ENVIRONMENT", "DEFAULT", "MEANING"}}
	for _, s := range settings(spec) {
		def := s.def
		if s.required {
			def = "(required)"
		}
		rows = append(rows, [4]string{"--" + s.flag, s.env, def, s.desc})
	}
	rows = append(rows, [4]string{"--version", "", "", "print the version and exit"})
	var width [3]int
	for _, r := range rows {
		for i := range width {
			width[i] = max(width[i], len(r[i]))
		}
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s  %-*s  %-*s  %s\n", width[0], r[0], width[1], r[1], width[2], r[2], r[3])
	}
}

// Version describes the build: version, VCS revision when known, Go version.
func Version(name, version string) string {
	rev := ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				rev = " " + s.Value[:12]
			}
		}
	}
	return fmt.Sprintf("%s %s%s %s %s/%s", name, version, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// Logger returns the process logger: text on a terminal, JSON otherwise
// (format "auto"), or as format says ("text", "json").
func Logger(w *os.File, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	if format == "auto" {
		format = "json"
		if fi, err := w.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			format = "text"
		}
	}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want auto, text or json", format)
}

// Secret returns value, or the trimmed contents of file when value is
// empty and file is set (TETHER_X_FILE, as containers and systemd
// credentials provide secrets).
func Secret(value, file string) (string, error) {
	if value != "" || file == "" {
		return value, nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("read secret file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
