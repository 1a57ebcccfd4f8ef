package cross

import (
	"path"
	"regexp"
	"strings"
)

// GoBuild is one go build command of a Makefile or a Dockerfile, read with
// the file's variables expanded. Tests use it to check that every way of
// building the agent uses AgentTags; the bench, to build an older revision
// with the tags of its own Makefile.
type GoBuild struct {
	Line    int      // where the command starts in the file, from 1
	Tags    string   // -tags; empty if none
	LDFlags string   // -ldflags
	GCFlags string   // -gcflags
	Pkgs    []string // the packages built
}

// Builds reports whether the command builds the package pkg, given as a
// path relative to the module root (./agent/cmd/tether-agent).
func (b GoBuild) Builds(pkg string) bool {
	want := strings.TrimPrefix(pkg, "./")
	for _, p := range b.Pkgs {
		p = strings.TrimPrefix(strings.TrimSuffix(p, "/"), "./")
		if p == want || strings.HasSuffix(p, "/"+want) {
			return true
		}
	}
	return false
}

// SameTags reports whether two -tags values name the same set of tags.
func SameTags(a, b string) bool {
	set := func(s string) map[string]bool {
		m := map[string]bool{}
		for t := range strings.FieldsFuncSeq(s, func(r rune) bool { return r == ',' || r == ' ' }) {
			m[t] = true
		}
		return m
	}
	x, y := set(a), set(b)
	if len(x) != len(y) {
		return false
	}
	for t := range x {
		if !y[t] {
			return false
		}
	}
	return true
}

var (
	makeVar   = regexp.MustCompile(`^(?:export\s+|override\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(:{1,3}=|\?=|\+=|=)\s*(.*)$`)
	dockerVar = regexp.MustCompile(`(?i)^(ARG|ENV)\s+(.*)$`)
	varRef    = regexp.MustCompile(`\$(?:\(([A-Za-z_][A-Za-z0-9_]*)\)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))`)
)

// goFlagsWithValue are the go build flags that take the next argument.
var goFlagsWithValue = map[string]bool{
	"-o": true, "-p": true, "-C": true, "-tags": true, "-ldflags": true, "-gcflags": true, "-asmflags": true,
	"-mod": true, "-modfile": true, "-overlay": true, "-pgo": true, "-buildmode": true, "-compiler": true,
	"-gccgoflags": true, "-installsuffix": true, "-pkgdir": true, "-toolexec": true, "-covermode": true, "-coverpkg": true,
}

// GoBuilds returns the go build commands of a Makefile (its recipe lines)
// or a Dockerfile (its RUN instructions). Variables are Make's NAME := v
// (also =, ?=, +=, export) and the Dockerfile's ARG NAME=v and ENV NAME=v;
// $(NAME), ${NAME} and $NAME are expanded, anything else ($(shell ...)) is
// left as written.
func GoBuilds(file []byte) []GoBuild {
	vars := map[string]string{}
	var expand func(s string, depth int) string
	expand = func(s string, depth int) string {
		return varRef.ReplaceAllStringFunc(s, func(ref string) string {
			m := varRef.FindStringSubmatch(ref)
			v, ok := vars[m[1]+m[2]+m[3]]
			if !ok || depth > 10 {
				return ref
			}
			return expand(v, depth+1)
		})
	}
	var out []GoBuild
	lines := strings.Split(string(file), "\n")
	for i := 0; i < len(lines); i++ {
		start := i + 1
		line := lines[i]
		for strings.HasSuffix(line, "\\") && i+1 < len(lines) { // continuation
			i++
			line = strings.TrimSuffix(line, "\\") + " " + lines[i]
		}
		recipe := strings.HasPrefix(line, "\t")
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if m := makeVar.FindStringSubmatch(line); m != nil && !recipe {
			if m[2] == "+=" {
				vars[m[1]] += " " + m[3]
			} else if m[2] != "?=" || vars[m[1]] == "" {
				vars[m[1]] = m[3]
			}
			continue
		}
		if m := dockerVar.FindStringSubmatch(line); m != nil && !recipe {
			for _, w := range shellWords(m[2]) {
				name, value, _ := strings.Cut(w, "=")
				if _, ok := vars[name]; !ok || value != "" {
					vars[name] = expand(value, 0)
				}
			}
			continue
		}
		words := shellWords(expand(line, 0))
		for cmd := range splitCommands(words) {
			if b, ok := parseGoBuild(cmd); ok {
				b.Line = start
				out = append(out, b)
			}
		}
	}
	return out
}

// splitCommands yields the simple commands of a shell line.
func splitCommands(words []string) func(func([]string) bool) {
	return func(yield func([]string) bool) {
		var cmd []string
		for _, w := range append(words, ";") {
			switch w {
			case "&&", "||", ";", "|":
				if len(cmd) > 0 && !yield(cmd) {
					return
				}
				cmd = nil
			default:
				cmd = append(cmd, w)
			}
		}
	}
}

func parseGoBuild(cmd []string) (GoBuild, bool) {
	var b GoBuild
	for i := 0; i+1 < len(cmd); i++ {
		if path.Base(strings.TrimLeft(cmd[i], "@-+")) != "go" || cmd[i+1] != "build" {
			continue
		}
		args := cmd[i+2:]
		for j := 0; j < len(args); j++ {
			a := args[j]
			if !strings.HasPrefix(a, "-") {
				b.Pkgs = append(b.Pkgs, a)
				continue
			}
			name, value, hasValue := strings.Cut(strings.Replace(a, "--", "-", 1), "=")
			if !hasValue && goFlagsWithValue[name] && j+1 < len(args) {
				j++
				value = args[j]
			}
			switch name {
			case "-tags":
				b.Tags = value
			case "-ldflags":
				b.LDFlags = value
			case "-gcflags":
				b.GCFlags = value
			}
		}
		return b, true
	}
	return b, false
}

// shellWords splits a line into words as a POSIX shell does for quotes and
// backslashes (no expansion).
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	inWord := false
	var quote rune
	escaped := false
	for _, r := range s {
		switch {
		case escaped:
			w.WriteRune(r)
			escaped = false
		case r == '\\' && quote != '\'':
			escaped, inWord = true, true
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				w.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}
