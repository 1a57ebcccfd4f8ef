package cross

import (
	"bytes"
	"go/format"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// repoRoot is the module root, seen from this package's directory.
const repoRoot = ".."

// goFiles walks the repository's Go files, skipping the patched smux copy
// (upstream's formatting) and test data.
func goFiles(t *testing.T, fn func(path string)) {
	t.Helper()
	err := filepath.WalkDir(repoRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "third_party" || d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != repoRoot {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".go") {
			fn(path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestGofmt: every Go file of ours is gofmt'ed.
func TestGofmt(t *testing.T) {
	goFiles(t, func(path string) {
		src, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := format.Source(src); err != nil || !bytes.Equal(got, src) {
			t.Errorf("%s is not gofmt'ed (run gofmt -w %s)", path, path)
		}
	})
}

// TestPackageDocs: every package of ours has a doc comment that starts
// "Package NAME" (or "Command NAME" for a main package) and says its job.
func TestPackageDocs(t *testing.T) {
	docs := map[string]bool{} // dir → has a doc
	goFiles(t, func(path string) {
		if strings.HasSuffix(path, "_test.go") {
			return
		}
		dir := filepath.Dir(path)
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.PackageClauseOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		if _, seen := docs[dir]; !seen {
			docs[dir] = false
		}
		if f.Doc == nil {
			return
		}
		text := f.Doc.Text()
		want := "Package " + f.Name.Name + " "
		if f.Name.Name == "main" {
			want = "Command " + filepath.Base(dir) + " "
		}
		if !strings.HasPrefix(text, want) || len(strings.Fields(text)) < 5 {
			t.Errorf("%s: package doc %q should start %q and state the package's job", path, firstLine(text), want)
		}
		docs[dir] = true
	})
	for dir, ok := range docs {
		if !ok {
			t.Errorf("%s: no package doc comment", dir)
		}
	}
}

func firstLine(s string) string { l, _, _ := strings.Cut(s, "\n"); return l }
