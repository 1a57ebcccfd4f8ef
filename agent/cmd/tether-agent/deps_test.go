package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the agent small: it must not link the relay's and control
// plane's heavy dependencies, nor the testing package.
func TestDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	// net/http alone would add about a megabyte (see cross's size budgets).
	forbidden := []string{"net/http", "github.com/coder/websocket", "go.etcd.io/bbolt", "github.com/nats-io/", "github.com/prometheus/", "github.com/tetherfleet/tether/controlplane", "github.com/tetherfleet/tether/relay"}
	for dep := range strings.FieldsSeq(string(out)) {
		if dep == "testing" {
			t.Errorf("tether-agent links the testing package")
		}
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") || strings.HasSuffix(f, "/") && strings.HasPrefix(dep, f) {
				t.Errorf("tether-agent links %s", dep)
			}
		}
	}
}
