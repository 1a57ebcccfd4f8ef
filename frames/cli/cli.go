// Package cli is the command-line surface every Tether binary shares: one
// envconfig spec per binary, filled from TETHER_* environment variables by
// github.com/kelseyhightower/envconfig with flags layered over them, --help
// rendered from the same spec, --version, warnings for unknown TETHER_*
// variables, the slog logger and secrets read from files.
//
// A spec is a flat struct whose fields carry envconfig's tags:
// `envconfig:"NAME"` or `split_words:"true"`, `default`, `required` and
// `desc`. Every setting is the variable TETHER_NAME and the flag --name.
//
// It lives under frames because the agent and the servers share it, and it
// carries no server dependency.
package cli

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"
	"github.com/tetherfleet/tether/frames/secretfile"
)

// Prefix starts every environment variable.
const Prefix = "TETHER"

// ErrHelp is returned by Parse after printing --help or --version: the
// program should exit 0.
var ErrHelp = errors.New("help shown")

// setting is one field of a spec, as envconfig names it.
type setting struct {
	name      string // the struct field
	env, flag string // TETHER_RELAY_URL, relay-url
	field     reflect.Value
	tags      reflect.StructTag
}

func (s setting) required() bool { return s.tags.Get("required") == "true" }

// settings lists spec's fields under envconfig's names: the envconfig tag,
// or with split_words the field name split into words. The values are
// settable fields of spec. (envconfig's Usage would tell the names, but it
// links text/template, which costs the agent more than a megabyte;
// CheckNames holds this naming to envconfig's own in tests.)
func settings(spec any) ([]setting, error) {
	v := reflect.ValueOf(spec)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return nil, fmt.Errorf("cli: spec %T: %w", spec, envconfig.ErrInvalidSpecification)
	}
	v = v.Elem()
	var out []setting
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if !f.IsExported() || f.Tag.Get("ignored") == "true" {
			continue
		}
		if f.Type.Kind() == reflect.Struct && f.Type != durationType {
			return nil, fmt.Errorf("cli: spec %T: field %s: nested specs are not supported", spec, f.Name)
		}
		key := f.Tag.Get("envconfig")
		if key == "" {
			key = f.Name
			if f.Tag.Get("split_words") == "true" {
				key = splitWords(f.Name)
			}
		}
		key = strings.ToUpper(Prefix + "_" + key)
		out = append(out, setting{
			name:  f.Name,
			env:   key,
			flag:  strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(key, Prefix+"_")), "_", "-"),
			field: v.Field(i),
			tags:  f.Tag,
		})
	}
	return out, nil
}

var (
	wordsRE   = regexp.MustCompile("([^A-Z]+|[A-Z]+[^A-Z]+|[A-Z]+)")
	acronymRE = regexp.MustCompile("([A-Z]+)([A-Z][^A-Z]+)")
)

// splitWords is envconfig's split_words: RelayURL → RELAY_URL, HTTPSAddr →
// HTTPS_ADDR.
func splitWords(name string) string {
	var words []string
	for _, w := range wordsRE.FindAllStringSubmatch(name, -1) {
		if m := acronymRE.FindStringSubmatch(w[0]); m != nil {
			words = append(words, m[1], m[2])
		} else {
			words = append(words, w[0])
		}
	}
	return strings.ToUpper(strings.Join(words, "_"))
}

// Unknown is a TETHER_* variable the binary does not know.
type Unknown struct {
	Var     string // as set
	Closest string // the known variable nearest to it
}

func (u Unknown) String() string {
	return fmt.Sprintf("ignoring unknown environment variable %s (closest known: %s)", u.Var, u.Closest)
}

// Parse fills spec (a pointer to a struct with envconfig tags) from the
// environment and from args, flags winning over variables; the process
// environment is not changed. about is printed at the top of --help.
// Unknown TETHER_* variables are returned, for the caller to warn about
// once its logger exists: Kubernetes service links
// (TETHER_RELAY_SERVICE_HOST) and env files shared between binaries must
// not stop a binary.
func Parse(name, version, about string, spec any, args []string, stdout io.Writer) ([]Unknown, error) {
	rest, unknown, err := ParseCommand(name, version, about, spec, args, stdout)
	if err == nil && len(rest) > 0 {
		return nil, fmt.Errorf("unexpected argument %q (see %s --help)", rest[0], name)
	}
	return unknown, err
}

// ParseCommand is Parse for a program whose first argument that is not a
// flag starts a command of its own (tetherctl): it returns that argument
// and the rest.
func ParseCommand(name, version, about string, spec any, args []string, stdout io.Writer) (rest []string, _ []Unknown, _ error) {
	all, err := settings(spec)
	if err != nil {
		return nil, nil, err
	}
	flags := map[string]string{} // env name → raw flag value
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if !strings.HasPrefix(arg, "-") {
			rest = args[i:]
			break
		}
		key, val, hasVal := strings.Cut(strings.TrimLeft(arg, "-"), "=")
		switch key {
		case "h", "help":
			Usage(stdout, name, about, spec)
			return nil, nil, ErrHelp
		case "version":
			fmt.Fprintln(stdout, Version(name, version))
			return nil, nil, ErrHelp
		}
		j := slices.IndexFunc(all, func(s setting) bool { return s.flag == key })
		if j < 0 {
			return nil, nil, fmt.Errorf("unknown flag %s (see %s --help)", arg, name)
		}
		if !hasVal {
			switch {
			case all[j].field.Kind() == reflect.Bool:
				val = "true" // --flag alone turns a switch on
			case i+1 >= len(args):
				return nil, nil, fmt.Errorf("flag %s needs a value (see %s --help)", arg, name)
			default:
				i++
				val = args[i]
			}
		}
		flags[all[j].env] = val
	}
	if err := process(spec, all, flags); err != nil {
		return nil, nil, fmt.Errorf("%w (see %s --help)", err, name)
	}
	return rest, unknown(all), nil
}

// process runs envconfig over spec, then sets the flags' values over it
// and checks the required settings. envconfig processes a copy of the
// spec's type whose fields are tagged with their full variable names and
// no `required`: a required setting may come from its flag, which
// envconfig cannot know, and a full name keeps envconfig from falling back
// to the unprefixed one (NATS_URL for TETHER_NATS_URL), which belongs to
// other programs.
func process(spec any, all []setting, flags map[string]string) error {
	v := reflect.ValueOf(spec).Elem()
	shadow := reflect.New(shadowType(v.Type(), all))
	shadow.Elem().Set(v.Convert(shadow.Elem().Type()))
	if err := envconfig.Process("", shadow.Interface()); err != nil {
		var pe *envconfig.ParseError
		if errors.As(err, &pe) {
			return fmt.Errorf("%s=%q: %v", pe.KeyName, pe.Value, pe.Err)
		}
		return err
	}
	v.Set(shadow.Elem().Convert(v.Type()))
	for _, s := range all {
		raw, fromFlag := flags[s.env]
		if fromFlag {
			if err := set(s.field, raw); err != nil {
				return fmt.Errorf("--%s=%q: %v", s.flag, raw, err)
			}
		}
		if _, inEnv := os.LookupEnv(s.env); s.required() && !fromFlag && !inEnv {
			return fmt.Errorf("required variable %s is not set (or pass --%s)", s.env, s.flag)
		}
	}
	return nil
}

// shadowType is t with each setting's field tagged with its full variable
// name, its default and its description, and nothing else.
func shadowType(t reflect.Type, all []setting) reflect.Type {
	fields := make([]reflect.StructField, t.NumField())
	for i := range fields {
		f := t.Field(i)
		tag := []string{`ignored:"true"`}
		if j := slices.IndexFunc(all, func(s setting) bool { return s.name == f.Name }); j >= 0 {
			tag = []string{"envconfig:" + strconv.Quote(all[j].env)}
			for _, k := range []string{"default", "desc"} {
				if val, ok := f.Tag.Lookup(k); ok {
					tag = append(tag, k+":"+strconv.Quote(val))
				}
			}
		}
		f.Tag = reflect.StructTag(strings.Join(tag, " "))
		fields[i] = f
	}
	return reflect.StructOf(fields)
}

var durationType = reflect.TypeFor[time.Duration]()

// set decodes a flag's value into a field, as envconfig decodes variables
// of the kinds a spec uses.
func set(f reflect.Value, raw string) error {
	if f.Type() == durationType {
		d, err := time.ParseDuration(raw)
		f.SetInt(int64(d))
		return err
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(raw)
	case reflect.Bool:
		b, err := strconv.ParseBool(raw)
		f.SetBool(b)
		return err
	case reflect.Int, reflect.Int64, reflect.Int32:
		n, err := strconv.ParseInt(raw, 0, f.Type().Bits())
		f.SetInt(n)
		return err
	case reflect.Uint, reflect.Uint64, reflect.Uint32, reflect.Uint16:
		n, err := strconv.ParseUint(raw, 0, f.Type().Bits())
		f.SetUint(n)
		return err
	default:
		return fmt.Errorf("cli: flags of type %s are not supported", f.Type())
	}
	return nil
}

// unknown lists the TETHER_* variables of the environment that are no
// setting of any Tether binary, each with the closest setting of this one.
func unknown(all []setting) []Unknown {
	var out []Unknown
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, Prefix+"_") || known(k) || slices.ContainsFunc(all, func(s setting) bool { return s.env == k }) {
			continue
		}
		u := Unknown{Var: k}
		best := -1
		for _, s := range all {
			if d := distance(k, s.env); best < 0 || d < best {
				best, u.Closest = d, s.env
			}
		}
		out = append(out, u)
	}
	return out
}

// distance is the Levenshtein distance between a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// Usage prints the settings of spec: flag, variable, default and meaning.
func Usage(w io.Writer, name, about string, spec any) {
	all, err := settings(spec)
	if err != nil {
		panic(err) // a spec is fixed at compile time: a bad one is a bug
	}
	fmt.Fprintf(w, "%s\n\nUsage: %s [flags]\n\nEvery setting is an environment variable or the flag beside it (the flag wins).\n\n", about, name)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FLAG\tENVIRONMENT\tDEFAULT\tMEANING")
	for _, s := range all {
		def := s.tags.Get("default")
		if s.required() {
			def = "(required)"
		}
		fmt.Fprintf(tw, "--%s\t%s\t%s\t%s\n", s.flag, s.env, def, s.tags.Get("desc"))
	}
	fmt.Fprintln(tw, "--version\t\t\tprint the version and exit")
	tw.Flush()
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

// WarnUnknown logs each unknown variable once.
func WarnUnknown(log *slog.Logger, us []Unknown) {
	for _, u := range us {
		log.Warn("ignoring unknown environment variable", "var", u.Var, "closest_known", u.Closest)
	}
}

// Secret returns value, or the trimmed contents of file when value is
// empty and file is set (TETHER_X_FILE, as containers and systemd
// credentials provide secrets). A file others may read is refused
// (secretfile.ReadShared: its group may read it, as secret stores mount).
func Secret(value, file string) (string, error) {
	if value != "" || file == "" {
		return value, nil
	}
	b, err := secretfile.ReadShared(file)
	if err != nil {
		return "", fmt.Errorf("read secret file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
