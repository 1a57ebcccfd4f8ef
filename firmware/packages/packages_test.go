package packages

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/tetherfleet/tether/firmware"
)

func TestPackageVersion(t *testing.T) {
	for in, want := range map[string]string{
		"v1.4.0": "1.4.0", "1.4.0-rc.1": "1.4.0-rc.1", "": "0.0.0", "dev": "0.0.0",
		"c34ac3b-dirty": "0.0.0~c34ac3b.dirty", "v1.4.0-3-gabc1234": "1.4.0-3-gabc1234",
	} {
		if got := PackageVersion(in); got != want {
			t.Errorf("PackageVersion(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestScriptsShellcheck(t *testing.T) {
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("shellcheck is not installed (make tools installs it)")
		}
		t.Skip("shellcheck is not installed")
	}
	if out, err := exec.Command(sc, "-s", "sh", "-S", "style", "postinstall.sh", "preremove.sh", "postremove.sh").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// dpkgRoot is a throwaway root dpkg installs into (--root, the maintainer
// scripts run chrootless with DPKG_ROOT set): nothing on the host changes.
type dpkgRoot struct {
	t    *testing.T
	dir  string
	dpkg string
}

func newDpkgRoot(t *testing.T) dpkgRoot {
	t.Helper()
	dpkg, err := exec.LookPath("dpkg")
	if err != nil {
		t.Skip("dpkg is not installed")
	}
	if os.Geteuid() != 0 {
		t.Skip("dpkg --root needs root (the files are owned by root)")
	}
	r := dpkgRoot{t: t, dir: t.TempDir(), dpkg: dpkg}
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"} {
		if err := os.MkdirAll(filepath.Join(r.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range map[string]string{
		"var/lib/dpkg/status": "", "var/lib/dpkg/available": "",
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n",
		"etc/shadow": "root:*:19000:0:99999:7:::\n", "etc/gshadow": "root:*::\n",
	} {
		if err := os.WriteFile(filepath.Join(r.dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func (r dpkgRoot) run(args ...string) string {
	r.t.Helper()
	cmd := exec.CommandContext(r.t.Context(), r.dpkg, append([]string{"--root=" + r.dir, "--force-script-chrootless", "--force-unsafe-io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		r.t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (r dpkgRoot) stat(path string) (os.FileInfo, bool) {
	st, err := os.Lstat(filepath.Join(r.dir, path))
	return st, err == nil
}

func (r dpkgRoot) read(path string) []byte {
	b, err := os.ReadFile(filepath.Join(r.dir, path))
	if err != nil {
		r.t.Fatal(err)
	}
	return b
}

// TestDebInstallsIntoThrowawayRoot builds the amd64 .deb and installs,
// upgrades, removes and purges it with dpkg in a throwaway root.
func TestDebInstallsIntoThrowawayRoot(t *testing.T) {
	r := newDpkgRoot(t)
	hostPasswd, _ := os.ReadFile("/etc/passwd")
	dist, out := t.TempDir(), t.TempDir()
	bin := []byte("\x7fELF stand-in for the agent binary\n")
	if err := os.WriteFile(filepath.Join(dist, "tether-agent-linux-amd64"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	paths, err := Build(t.Context(), Options{DistDir: dist, OutDir: out, Arches: []string{"amd64"}, Version: "v1.4.0"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(out, "tether-agent_1.4.0_amd64.deb"), filepath.Join(out, "tether-agent_1.4.0_amd64.apk")}; strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Fatalf("built %q, want %q", paths, want)
	}
	deb := paths[0]
	info, err := exec.Command("dpkg-deb", "--field", deb, "Package", "Version", "Architecture").CombinedOutput()
	if err != nil || !strings.Contains(string(info), "Version: 1.4.0") || !strings.Contains(string(info), "Architecture: amd64") {
		t.Fatalf("dpkg-deb --field: %v\n%s", err, info)
	}
	if conf, _ := exec.Command("dpkg-deb", "--ctrl-tarfile", deb).Output(); !bytes.Contains(conf, []byte(firmware.EnvFilePath)) {
		t.Error("agent.env is not a conffile")
	}

	r.run("-i", deb)
	for path, mode := range map[string]os.FileMode{
		firmware.BinaryPath:  0o755,
		UnitPath:             0o644,
		firmware.EnvFilePath: 0o600,
		firmware.StateDir:    os.ModeDir | 0o700,
		"/opt/tether-agent":  os.ModeDir | 0o755,
	} {
		st, ok := r.stat(path)
		if !ok || st.Mode() != mode {
			t.Errorf("%s: mode %v, want %v", path, st.Mode(), mode)
		}
	}
	if !bytes.Equal(r.read(firmware.BinaryPath), bin) {
		t.Error("the binary differs")
	}
	if !bytes.Equal(r.read(UnitPath), firmware.Unit()) {
		t.Error("the unit differs from firmware.Unit()")
	}
	if !bytes.Equal(r.read(firmware.EnvFilePath), firmware.AgentEnv()) {
		t.Error("agent.env differs from firmware.AgentEnv()")
	}
	if !strings.Contains(string(r.read("etc/passwd")), "\ntether:x:") {
		t.Errorf("no user tether:\n%s", r.read("etc/passwd"))
	}
	if link, err := os.Readlink(filepath.Join(r.dir, "etc/systemd/system/multi-user.target.wants", firmware.UnitName)); err != nil || link != UnitPath {
		t.Errorf("unit not enabled: %q %v", link, err)
	}
	// The service user owns its binary's directory (updates) and state.
	var uid string
	for line := range strings.SplitSeq(string(r.read("etc/passwd")), "\n") {
		if f := strings.Split(line, ":"); len(f) > 3 && f[0] == "tether" {
			uid = f[2]
		}
	}
	for _, p := range []string{"/opt/tether-agent", firmware.BinaryPath, firmware.StateDir} {
		st, _ := r.stat(p)
		if got := strconv.FormatUint(uint64(st.Sys().(*syscall.Stat_t).Uid), 10); got != uid {
			t.Errorf("%s is owned by uid %s, want tether's %s", p, got, uid)
		}
	}

	// An upgrade keeps the operator's agent.env (conffile, noreplace).
	edited := []byte("TETHER_RELAY_URL=wss://relay.example.com\n")
	if err := os.WriteFile(filepath.Join(r.dir, firmware.EnvFilePath), edited, 0o600); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(r.dir, firmware.StateDir, "device.key"), []byte("key"), 0o600)
	r.run("--force-confold", "-i", deb)
	if !bytes.Equal(r.read(firmware.EnvFilePath), edited) {
		t.Error("the upgrade replaced agent.env")
	}

	r.run("--remove", "tether-agent")
	if _, ok := r.stat(firmware.BinaryPath); ok {
		t.Error("remove left the binary")
	}
	if _, ok := r.stat(firmware.StateDir + "/device.key"); !ok {
		t.Error("remove deleted the identity")
	}
	r.run("--purge", "tether-agent")
	if _, ok := r.stat(firmware.StateDir); ok {
		t.Error("purge kept the state dir")
	}
	if _, ok := r.stat(firmware.EnvFilePath); ok {
		t.Error("purge kept agent.env")
	}
	if now, _ := os.ReadFile("/etc/passwd"); !bytes.Equal(now, hostPasswd) {
		t.Error("the host's /etc/passwd changed")
	}
}
