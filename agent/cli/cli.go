// Package cli is the command-line surface every Tether binary shares: one
// settings struct filled from TETHER_* environment variables (envconfig)
// or the matching flags, --help that lists them, --version, and the slog
// logger. It carries no server dependency, so the agent can use it.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"strings"
	"text/tabwriter"

	"github.com/kelseyhightower/envconfig"
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
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	all := settings(spec)
	values := make([]*string, len(all))
	for i, s := range all {
		values[i] = fs.String(s.flag, "", s.desc)
	}
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			Usage(stdout, name, about, spec)
			return ErrHelp
		}
		return fmt.Errorf("%w (see %s --help)", err, name)
	}
	if *showVersion {
		fmt.Fprintln(stdout, Version(name, version))
		return ErrHelp
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see %s --help)", fs.Arg(0), name)
	}
	fs.Visit(func(f *flag.Flag) {
		for i, s := range all {
			if s.flag == f.Name {
				os.Setenv(s.env, *values[i])
			}
		}
	})
	if strict {
		if err := envconfig.CheckDisallowed(Prefix, spec); err != nil {
			return fmt.Errorf("%w (see %s --help)", err, name)
		}
	}
	if err := envconfig.Process(Prefix, spec); err != nil {
		return fmt.Errorf("%w (see %s --help)", err, name)
	}
	return nil
}

// Usage prints the settings: flag, variable, default and meaning.
func Usage(w io.Writer, name, about string, spec any) {
	fmt.Fprintf(w, "%s\n\nUsage: %s [flags]\n\nEvery setting is an environment variable or the flag beside it (the flag wins).\n\n", about, name)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FLAG\tENVIRONMENT\tDEFAULT\tMEANING")
	for _, s := range settings(spec) {
		def := s.def
		if s.required {
			def = "(required)"
		}
		fmt.Fprintf(tw, "--%s\t%s\t%s\t%s\n", s.flag, s.env, def, s.desc)
	}
	fmt.Fprintf(tw, "--version\t\t\tprint the version and exit\n")
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
