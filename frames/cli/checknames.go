package cli

import (
	"fmt"
	"io"
	"reflect"
	"slices"
	"text/template"

	"github.com/kelseyhightower/envconfig"
)

// CheckNames reports whether this package names spec's settings as
// envconfig itself does (through envconfig's Usage), and whether Known
// lists them all. Call it from a test of each binary: binaries do not link
// it, nor text/template.
func CheckNames(spec any) error {
	ours, err := envconfigNames(spec)
	if err != nil {
		return err
	}
	for _, env := range ours {
		if !known(env) {
			return fmt.Errorf("spec %T: %s is missing from frames/cli.Known", spec, env)
		}
	}
	return nil
}

// envconfigNames returns spec's variable names after checking that they
// are envconfig's.
func envconfigNames(spec any) ([]string, error) {
	var theirs []string
	collect := func(info any) string {
		theirs = append(theirs, reflect.ValueOf(info).FieldByName("Key").String())
		return ""
	}
	t := template.Must(template.New("names").Funcs(template.FuncMap{"collect": collect}).Parse(`{{range .}}{{collect .}}{{end}}`))
	if err := envconfig.Usaget(Prefix, spec, io.Discard, t); err != nil {
		return nil, fmt.Errorf("envconfig: %w", err)
	}
	all, err := settings(spec)
	if err != nil {
		return nil, err
	}
	var ours []string
	for _, s := range all {
		ours = append(ours, s.env)
	}
	if !slices.Equal(ours, theirs) {
		return nil, fmt.Errorf("spec %T: cli names %v, envconfig names %v", spec, ours, theirs)
	}
	return ours, nil
}
