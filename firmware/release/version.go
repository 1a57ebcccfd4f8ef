package release

import (
	"cmp"
	"fmt"
	"strconv"
	"strings"
)

// Version is a release version: vMAJOR.MINOR.PATCH with an optional
// -PRERELEASE (dot-separated identifiers of [0-9A-Za-z-]), compared as
// semver 2.0 does (v1.4.0-rc.1 < v1.4.0). Build metadata (+…) is not
// accepted.
//
// Anything else an agent may report (the "dev" of an unstamped build, or
// `git describe` output such as "c162334-dirty") is a development build:
// ParseVersion refuses it, and a development build is never offered or
// given an update (ErrDevBuild): install a release on it first.
type Version struct {
	Major, Minor, Patch uint64
	Pre                 string
}

// maxVersionLen bounds a version string.
const maxVersionLen = 64

// ParseVersion parses "vMAJOR.MINOR.PATCH[-PRE]".
func ParseVersion(s string) (Version, error) {
	bad := func(why string) (Version, error) {
		return Version{}, fmt.Errorf("version %q: %s (want vMAJOR.MINOR.PATCH or vMAJOR.MINOR.PATCH-PRE, e.g. v1.4.0)", trunc(s), why)
	}
	if len(s) > maxVersionLen {
		return bad("too long")
	}
	rest, ok := strings.CutPrefix(s, "v")
	if !ok {
		return bad("no leading v")
	}
	core, pre, hasPre := strings.Cut(rest, "-")
	parts := strings.Split(core, ".")
	if len(parts) != 3 {
		return bad("not three numbers")
	}
	var n [3]uint64
	for i, p := range parts {
		if p == "" || (len(p) > 1 && p[0] == '0') || strings.TrimLeft(p, "0123456789") != "" {
			return bad("not a number without leading zeros: " + strconv.Quote(p))
		}
		var err error
		if n[i], err = strconv.ParseUint(p, 10, 32); err != nil {
			return bad("number out of range")
		}
	}
	if hasPre {
		for id := range strings.SplitSeq(pre, ".") {
			if id == "" || strings.Trim(id, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-") != "" {
				return bad("bad pre-release identifier " + strconv.Quote(id))
			}
			if isNum(id) && len(id) > 1 && id[0] == '0' {
				return bad("numeric pre-release identifier with a leading zero")
			}
		}
	}
	return Version{Major: n[0], Minor: n[1], Patch: n[2], Pre: pre}, nil
}

// IsRelease reports whether s is a release version (not a development
// build).
func IsRelease(s string) bool {
	_, err := ParseVersion(s)
	return err == nil
}

// String formats v as ParseVersion reads it.
func (v Version) String() string {
	s := fmt.Sprintf("v%d.%d.%d", v.Major, v.Minor, v.Patch)
	if v.Pre != "" {
		s += "-" + v.Pre
	}
	return s
}

// Compare returns -1, 0 or +1 as v is older than, the same as or newer
// than w.
func (v Version) Compare(w Version) int {
	if c := cmp.Compare(v.Major, w.Major); c != 0 {
		return c
	}
	if c := cmp.Compare(v.Minor, w.Minor); c != 0 {
		return c
	}
	if c := cmp.Compare(v.Patch, w.Patch); c != 0 {
		return c
	}
	switch {
	case v.Pre == w.Pre:
		return 0
	case v.Pre == "":
		return 1 // a release is newer than its pre-releases
	case w.Pre == "":
		return -1
	}
	a, b := strings.Split(v.Pre, "."), strings.Split(w.Pre, ".")
	for i := 0; i < len(a) && i < len(b); i++ {
		if c := comparePre(a[i], b[i]); c != 0 {
			return c
		}
	}
	return cmp.Compare(len(a), len(b))
}

// comparePre compares pre-release identifiers: numbers numerically and
// below alphanumerics, alphanumerics in ASCII order.
func comparePre(a, b string) int {
	na, nb := isNum(a), isNum(b)
	switch {
	case na && nb:
		if c := cmp.Compare(len(a), len(b)); c != 0 {
			return c // no leading zeros: longer is larger
		}
		return strings.Compare(a, b)
	case na:
		return -1
	case nb:
		return 1
	}
	return strings.Compare(a, b)
}

func isNum(s string) bool { return s != "" && strings.TrimLeft(s, "0123456789") == "" }

// Compare compares two version strings as Version.Compare does; either
// not being a release version is an error.
func Compare(a, b string) (int, error) {
	va, err := ParseVersion(a)
	if err != nil {
		return 0, err
	}
	vb, err := ParseVersion(b)
	if err != nil {
		return 0, err
	}
	return va.Compare(vb), nil
}

func trunc(s string) string {
	if len(s) > maxVersionLen {
		return s[:maxVersionLen] + "…"
	}
	return s
}
