package firmware_test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tetherfleet/tether/firmware"
)

// need returns the path of a tool, skipping the test when it is missing,
// or failing it under CI=true (make tools installs it).
func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed (make tools installs it)", tool)
		}
		t.Skipf("%s is not installed (make tools installs it)", tool)
	}
	return p
}

// unitDirectives parses a systemd unit into section.key -> values.
func unitDirectives(t *testing.T, unit []byte) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(unit))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("unit line %d: %q is not KEY=VALUE in a section", n, line)
			}
			out[section+"."+k] = append(out[section+"."+k], v)
		}
	}
	return out
}

func TestUnitDirectives(t *testing.T) {
	d := unitDirectives(t, firmware.Unit())
	want := map[string][]string{
		"Unit.After":                       {"network-online.target time-sync.target"},
		"Unit.Wants":                       {"network-online.target"},
		"Service.User":                     {"tether"},
		"Service.Restart":                  {"always"},
		"Service.RestartPreventExitStatus": {"3 4"},
		"Service.NoNewPrivileges":          {"yes"},
		"Service.ProtectSystem":            {"strict"},
		"Service.ProtectHome":              {"yes"},
		"Service.PrivateTmp":               {"yes"},
		"Service.StateDirectory":           {"tether-agent"},
		"Service.ReadWritePaths":           {"/opt/tether-agent"},
		"Service.CapabilityBoundingSet":    {""},
		"Service.AmbientCapabilities":      {""},
		"Service.EnvironmentFile":          {"-" + firmware.EnvFilePath},
		"Service.ExecStart":                {firmware.BinaryPath},
		"Service.ExecStartPre":             {"-" + firmware.BinaryPath + ".prev preflight", "-+" + firmware.ProvisionPath + " provision"},
		"Service.Environment":              {"TETHER_STATE_DIR=" + firmware.StateDir},
		"Install.WantedBy":                 {"multi-user.target"},
	}
	for k, v := range want {
		if !slices.Equal(d[k], v) {
			t.Errorf("%s = %q, want %q", k, d[k], v)
		}
	}
	if d["Service.DynamicUser"] != nil {
		t.Error("DynamicUser: the agent's binary directory must belong to a fixed user")
	}
}

// TestUnitSecurity holds the unit to an exposure of 2.5 or lower in
// systemd-analyze security (offline: no systemd needs to run).
func TestUnitSecurity(t *testing.T) {
	sa := need(t, "systemd-analyze")
	path := filepath.Join(t.TempDir(), firmware.UnitName)
	if err := os.WriteFile(path, firmware.Unit(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "security", "--offline=true", "--no-pager", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	score, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security exposure: %.1f", score)
	if score > 2.5 {
		t.Fatalf("exposure %.1f > 2.5:\n%s", score, out)
	}
}

// TestUnitVerifies: systemd-analyze verify finds nothing wrong with the
// unit's directives (the binary itself is not on this machine).
func TestUnitVerifies(t *testing.T) {
	sa := need(t, "systemd-analyze")
	path := filepath.Join(t.TempDir(), firmware.UnitName)
	if err := os.WriteFile(path, firmware.Unit(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command(sa, "verify", path).CombinedOutput()
	for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		if line != "" && !strings.Contains(line, "Command "+firmware.BinaryPath+" is not executable") {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}

func TestShellcheck(t *testing.T) {
	sc := need(t, "shellcheck")
	dir := t.TempDir()
	raw, err := os.ReadFile("install.sh")
	if err != nil {
		t.Fatal(err)
	}
	for name, script := range map[string][]byte{
		"install.sh": raw,
		"served.sh":  firmware.InstallScript("https://relay.example.com", []string{"RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3"}),
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, script, 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(sc, "-s", "sh", "-S", "style", p).CombinedOutput(); err != nil {
			t.Errorf("shellcheck %s: %v\n%s", name, err, out)
		}
	}
}

func TestInstallScriptFillsIn(t *testing.T) {
	s := string(firmware.InstallScript("https://relay.example.com:8443", []string{"RWQa", "RWQb"}))
	for _, want := range []string{
		"default_relay='https://relay.example.com:8443'\n",
		"default_keys='RWQa,RWQb'\n",
		"ExecStart=" + firmware.BinaryPath + "\n",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %q", want)
		}
	}
	if strings.Contains(s, "@relay@") || strings.Contains(s, "@unit@") || strings.Contains(s, "@release-keys@") {
		t.Error("script still has a placeholder")
	}
	// A quote in a value cannot end the shell string.
	s = string(firmware.InstallScript("https://x'; rm -rf /; '", nil))
	if !strings.Contains(s, `default_relay='https://x'\''; rm -rf /; '\'''`) {
		t.Errorf("relay URL not quoted:\n%s", s[:2000])
	}
	for _, sh := range []string{"dash", "sh"} {
		if p, err := exec.LookPath(sh); err == nil {
			cmd := exec.Command(p, "-n")
			cmd.Stdin = strings.NewReader(s)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s -n: %v\n%s", sh, err, out)
			}
		}
	}
}

// TestInstallScriptHelp: --help works on the piped script too (curl | sh
// -s -- --help), where there is no file to read the text from.
func TestInstallScriptHelp(t *testing.T) {
	cmd := exec.Command("sh", "-s", "--", "--help")
	cmd.Stdin = bytes.NewReader(firmware.InstallScript("https://relay.example.com", []string{"RWQa"}))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--token TOKEN") || !strings.Contains(string(out), "TETHER_INSTALL_ROOT") {
		t.Fatalf("--help: %v\n%s", err, out)
	}
}
