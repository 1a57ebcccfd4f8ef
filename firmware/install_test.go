package firmware_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/firmware"
	"github.com/tetherfleet/tether/firmware/release"
)

// hostArch is this machine's arch as manifests name it.
func hostArch(t *testing.T) string {
	t.Helper()
	tg, err := cross.Host("tether-agent")
	if err != nil {
		t.Fatal(err)
	}
	if tg.GOARCH == "arm" {
		t.Skip("the install test runs on amd64, arm64 or riscv64")
	}
	return tg.Arch()
}

// releaseKey is a release signing key for a test.
type releaseKey struct {
	pub  string // RW...
	sign func(manifest []byte) []byte
}

func newReleaseKey(t *testing.T) releaseKey {
	t.Helper()
	pubFile, privFile, err := release.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	priv, err := release.ReadPrivateKey(privFile, "")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(pubFile)), "\n")
	return releaseKey{pub: lines[len(lines)-1], sign: func(m []byte) []byte {
		sig, err := release.Sign(m, priv)
		if err != nil {
			t.Fatal(err)
		}
		return sig
	}}
}

// published is a release as the relay serves it.
type published struct {
	manifest, sig []byte
	files         map[string][]byte
}

// makeRelease signs a manifest for binary on arch. tamper, if set, changes
// the served binary after signing.
func makeRelease(t *testing.T, key releaseKey, version, arch string, binary []byte, tamper bool) published {
	t.Helper()
	sum := sha256.Sum256(binary)
	file := "tether-agent-linux-" + arch
	m := release.Manifest{Version: version, CreatedAt: time.Now().UTC().Truncate(time.Second),
		Artifacts: map[string]release.Artifact{arch: {File: file, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(binary))}}}
	mb, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	served := binary
	if tamper {
		served = bytes.Clone(binary)
		served[len(served)/2] ^= 0x55
	}
	return published{manifest: mb, sig: key.sign(mb), files: map[string][]byte{file: served}}
}

// releaseServer serves install.sh and a release at the relay's paths over
// TLS, and returns its URL and CA file.
type releaseServer struct {
	URL, CAFile string
	mu          sync.Mutex
	rel         published
	script      []byte
}

func (s *releaseServer) publish(p published) { s.mu.Lock(); s.rel = p; s.mu.Unlock() }

func startReleaseServer(t *testing.T, keys []string) *releaseServer {
	t.Helper()
	s := &releaseServer{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		rel, script := s.rel, s.script
		s.mu.Unlock()
		var body []byte
		switch p := r.URL.Path; {
		case p == "/install.sh":
			body = script
		case p == "/_tether/release/manifest.json":
			body = rel.manifest
		case p == "/_tether/release/manifest.json.minisig":
			body = rel.sig
		case strings.HasPrefix(p, "/_tether/release/"):
			body = rel.files[strings.TrimPrefix(p, "/_tether/release/")]
		}
		if body == nil {
			http.Error(w, "no release", http.StatusNotFound)
			return
		}
		w.Write(body)
	}))
	srv.StartTLS()
	t.Cleanup(srv.Close)
	s.URL = srv.URL
	s.script = firmware.InstallScript(srv.URL, keys)
	s.CAFile = filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, s.CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	return s
}

func writeFile(t *testing.T, path string, b []byte, mode fs.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

// pathWithout makes a PATH directory with every command of the host's
// PATH except the ones named: to run the script where minisign (or
// OpenSSL) is missing.
func pathWithout(t *testing.T, missing ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		ents, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range ents {
			name := e.Name()
			if strings.Contains(strings.Join(missing, " ")+" ", name+" ") {
				continue
			}
			if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
				continue // the first one on PATH wins
			}
			if err := os.Symlink(filepath.Join(d, name), filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

// installer runs install.sh with a shell into a throwaway root.
type installer struct {
	t      *testing.T
	shell  []string // e.g. {"dash"} or {"busybox", "sh"}
	root   string
	script string
	path   string // PATH; empty: the host's
}

func (in installer) run(env []string, args ...string) (string, error) {
	in.t.Helper()
	ctx, cancel := context.WithTimeout(in.t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, in.shell[0], append(append(in.shell[1:], in.script), args...)...)
	cmd.Env = append(os.Environ(), "TETHER_INSTALL_ROOT="+in.root)
	if in.path != "" {
		cmd.Env = append(cmd.Env, "PATH="+in.path)
	}
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	in.t.Logf("%s %s:\n%s", strings.Join(in.shell, " "), strings.Join(args, " "), out)
	return string(out), err
}

func (in installer) file(path string) ([]byte, fs.FileMode) {
	in.t.Helper()
	p := filepath.Join(in.root, path)
	b, err := os.ReadFile(p)
	if err != nil {
		in.t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		in.t.Fatal(err)
	}
	return b, st.Mode()
}

func (in installer) exists(path string) bool {
	_, err := os.Lstat(filepath.Join(in.root, path))
	return err == nil
}

// shells are the POSIX shells the script must run under.
func shells(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	if p, err := exec.LookPath("dash"); err == nil {
		out["dash"] = []string{p}
	}
	if p, err := exec.LookPath("busybox"); err == nil {
		out["busybox"] = []string{p, "sh"}
	} else if os.Getenv("CI") == "true" {
		t.Fatal("busybox is not installed (make tools installs it): install.sh must be run under busybox ash")
	}
	if len(out) == 0 {
		out["sh"] = []string{"sh"}
	}
	return out
}

// TestInstallScriptLocal runs install.sh as a device would: fetched from
// the server, run into a throwaway root, under each shell and with each
// verifier; a tampered binary and a manifest signed by another key are
// refused; a second run upgrades in place and keeps settings and
// identity; --uninstall keeps the identity, --purge removes it.
func TestInstallScriptLocal(t *testing.T) {
	need(t, "openssl")
	arch := hostArch(t)
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	bin1 := bytes.Repeat([]byte("agent v1\n"), 1000)
	bin2 := bytes.Repeat([]byte("agent v2\n"), 1200)
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)

	verifiers := map[string][]string{"openssl": {"minisign"}}
	if _, err := exec.LookPath("minisign"); err == nil {
		verifiers["minisign"] = nil
	}
	for shName, sh := range shells(t) {
		for vName, missing := range verifiers {
			t.Run(shName+"/"+vName, func(t *testing.T) {
				in := installer{t: t, shell: sh, root: t.TempDir(), script: scriptPath}
				if missing != nil {
					in.path = pathWithout(t, missing...)
				}
				token := "tth_testtoken0123456789"
				common := []string{"--relay-ca", srv.CAFile, "--wait", "0"}

				// A binary that differs from the signed manifest is refused.
				srv.publish(makeRelease(t, key, "v1.0.0", arch, bin1, true))
				out, err := in.run(nil, append([]string{"--token", token, "--services", "web=http://127.0.0.1:8080"}, common...)...)
				if err == nil || !strings.Contains(out, "does not match the signed manifest") {
					t.Fatalf("tampered binary: err %v", err)
				}
				if in.exists("opt/tether-agent/tether-agent") {
					t.Fatal("tampered binary installed")
				}
				// A manifest signed by another key is refused.
				srv.publish(makeRelease(t, newReleaseKey(t), "v1.0.0", arch, bin1, false))
				out, err = in.run(nil, append([]string{"--token", token, "--services", "web=http://127.0.0.1:8080"}, common...)...)
				if err == nil || !strings.Contains(out, "signature does not verify") {
					t.Fatalf("foreign key: err %v", err)
				}

				// Installed, from the environment.
				srv.publish(makeRelease(t, key, "v1.0.0", arch, bin1, false))
				if _, err := in.run([]string{"TETHER_ENROLL_TOKEN=" + token, "TETHER_SERVICES=web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22", "TETHER_DEVICE_NAME=pi01"}, common...); err != nil {
					t.Fatal(err)
				}
				checkInstalled(t, in, bin1, key.pub, srv, "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22", "pi01")
				tok, mode := in.file(firmware.TokenFilePath)
				if string(tok) != token+"\n" || mode.Perm() != 0o600 {
					t.Errorf("token file %q mode %v", tok, mode)
				}

				// The identity and the settings survive an upgrade.
				writeFile(t, filepath.Join(in.root, firmware.StateDir, "device.key"), []byte("key"), 0o600)
				srv.publish(makeRelease(t, key, "v2.0.0", arch, bin2, false))
				if _, err := in.run(nil, common...); err != nil {
					t.Fatal(err)
				}
				checkInstalled(t, in, bin2, key.pub, srv, "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22", "pi01")
				passwd, _ := in.file("etc/passwd")
				if n := strings.Count(string(passwd), "tether:"); n != 1 {
					t.Errorf("%d tether users in etc/passwd:\n%s", n, passwd)
				}

				if _, err := in.run(nil, "--uninstall"); err != nil {
					t.Fatal(err)
				}
				for _, p := range []string{firmware.BinaryPath, firmware.EnvFilePath, "etc/systemd/system/" + firmware.UnitName, firmware.TokenFilePath} {
					if in.exists(p) {
						t.Errorf("%s remains after --uninstall", p)
					}
				}
				if !in.exists(firmware.StateDir + "/device.key") {
					t.Error("--uninstall removed the identity")
				}
				if _, err := in.run(nil, "--uninstall", "--purge"); err != nil {
					t.Fatal(err)
				}
				if in.exists(firmware.StateDir) {
					t.Error("--purge kept the state dir")
				}
			})
		}
	}
}

// TestInstallScriptWithoutVerifier fails closed: with neither minisign
// nor OpenSSL the script refuses to install and says what to install.
func TestInstallScriptWithoutVerifier(t *testing.T) {
	arch := hostArch(t)
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	srv.publish(makeRelease(t, key, "v1.0.0", arch, []byte("agent"), false))
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	in := installer{t: t, shell: []string{"sh"}, root: t.TempDir(), script: scriptPath, path: pathWithout(t, "minisign", "openssl")}
	out, err := in.run(nil, "--token", "tth_x", "--services", "web=http://127.0.0.1:80", "--relay-ca", srv.CAFile, "--wait", "0")
	if err == nil || !strings.Contains(out, "install minisign") {
		t.Fatalf("err %v", err)
	}
	if in.exists(firmware.BinaryPath) {
		t.Fatal("installed without verifying")
	}
}

func checkInstalled(t *testing.T, in installer, bin []byte, key string, srv *releaseServer, services, name string) {
	t.Helper()
	b, mode := in.file(firmware.BinaryPath)
	if !bytes.Equal(b, bin) || mode.Perm() != 0o755 {
		t.Errorf("binary: %d bytes, mode %v", len(b), mode)
	}
	env, mode := in.file(firmware.EnvFilePath)
	if mode.Perm() != 0o600 {
		t.Errorf("env file mode %v", mode)
	}
	for _, want := range []string{
		"TETHER_RELAY_URL=wss://" + strings.TrimPrefix(srv.URL, "https://") + "\n",
		"TETHER_SERVICES=" + services + "\n",
		"TETHER_DEVICE_NAME=" + name + "\n",
		"TETHER_RELEASE_KEYS=" + key + "\n",
		"TETHER_ENROLL_TOKEN_FILE=" + firmware.TokenFilePath + "\n",
		"TETHER_RELAY_CA=/etc/tether/relay-ca.pem\n",
	} {
		if !strings.Contains(string(env), want) {
			t.Errorf("env file lacks %q:\n%s", want, env)
		}
	}
	unit, mode := in.file("etc/systemd/system/" + firmware.UnitName)
	if !bytes.Equal(unit, firmware.Unit()) || mode.Perm() != 0o644 {
		t.Errorf("unit differs from firmware.Unit() or mode %v:\n%s", mode, unit)
	}
	passwd, _ := in.file("etc/passwd")
	if !strings.Contains(string(passwd), "tether:x:") || !strings.Contains(string(passwd), ":/var/lib/tether-agent:/usr/sbin/nologin") {
		t.Errorf("etc/passwd:\n%s", passwd)
	}
	st, err := os.Stat(filepath.Join(in.root, firmware.StateDir))
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v %v", st, err)
	}
}

// TestInstallScriptArch detects the architecture from uname -m (a stand-in
// uname on PATH); the stand-in release has no binaries, so the script
// names the arch it looked for, or refuses a CPU without a build.
func TestInstallScriptArch(t *testing.T) {
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	srv.publish(makeRelease(t, key, "v1.0.0", "none", []byte("agent"), false))
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	path := pathWithout(t, "uname")
	for machine, want := range map[string]string{
		"x86_64":  "no agent for amd64",
		"aarch64": "no agent for arm64",
		"armv6l":  "no agent for armv6",
		"riscv64": "no agent for riscv64",
		"mipsel":  "no agent for mipsle",
		"sparc64": "no Tether agent for this CPU (sparc64)",
	} {
		t.Run(machine, func(t *testing.T) {
			writeFile(t, filepath.Join(path, "uname"), []byte("#!/bin/sh\necho "+machine+"\n"), 0o755)
			in := installer{t: t, shell: []string{"sh"}, root: t.TempDir(), script: scriptPath, path: path}
			out, err := in.run(nil, "--token", "tth_x", "--services", "web=http://127.0.0.1:80", "--relay-ca", srv.CAFile, "--wait", "0")
			if err == nil || !strings.Contains(out, want) {
				t.Fatalf("err %v, want %q", err, want)
			}
		})
	}
}

// TestInstallScriptImage: an image built with TETHER_INSTALL_ROOT (and
// TETHER_INSTALL_ARCH for the board) may leave the token and services to
// each card's tether.env; the user gets shadow entries as useradd would
// write, and --uninstall takes them all back.
func TestInstallScriptImage(t *testing.T) {
	need(t, "openssl")
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	bin := []byte("an armv6 agent")
	srv.publish(makeRelease(t, key, "v1.0.0", "armv6", bin, false))
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	in := installer{t: t, shell: []string{"sh"}, root: t.TempDir(), script: scriptPath}
	os.MkdirAll(filepath.Join(in.root, "etc"), 0o755)
	for name, content := range map[string]string{"passwd": "root:x:0:0::/root:/bin/sh\n", "group": "root:x:0:\n", "shadow": "root:*::::::\n", "gshadow": "root:*::\n"} {
		writeFile(t, filepath.Join(in.root, "etc", name), []byte(content), 0o640)
	}
	out, err := in.run([]string{"TETHER_INSTALL_ARCH=armv6"}, "--relay-ca", srv.CAFile, "--wait", "0")
	if err != nil || !strings.Contains(out, "needs a tether.env on its boot partition") {
		t.Fatalf("image install: %v", err)
	}
	if b, _ := in.file(firmware.BinaryPath); !bytes.Equal(b, bin) {
		t.Fatal("not the armv6 binary")
	}
	env, _ := in.file(firmware.EnvFilePath)
	if strings.Contains(string(env), "TETHER_SERVICES") || strings.Contains(string(env), "TETHER_ENROLL_TOKEN_FILE") {
		t.Errorf("agent.env names services or a token file:\n%s", env)
	}
	for _, f := range []string{"passwd", "group", "shadow", "gshadow"} {
		if b, _ := in.file("etc/" + f); !strings.Contains(string(b), "\ntether:") {
			t.Errorf("etc/%s has no tether entry:\n%s", f, b)
		}
	}
	if _, err := exec.LookPath("systemctl"); err == nil && !in.exists("etc/systemd/system/multi-user.target.wants/"+firmware.UnitName) {
		t.Error("the unit is not enabled in the image")
	}
	if _, err := in.run(nil, "--uninstall"); err != nil {
		t.Fatal(err)
	}
	if in.exists("etc/systemd/system/multi-user.target.wants/" + firmware.UnitName) {
		t.Error("--uninstall left the unit enabled")
	}
	for _, f := range []string{"passwd", "group", "shadow", "gshadow"} {
		if b, _ := in.file("etc/" + f); strings.Contains(string(b), "tether:") {
			t.Errorf("etc/%s keeps the tether entry:\n%s", f, b)
		}
	}
}

// TestInstallScriptARMv7 tells armv7 from armv6 on an "armv7l" kernel by
// /proc/cpuinfo's VFPv3 (Go's GOARM=7 needs it): a stand-in cpuinfo bound
// over the real one in a private mount namespace (root and unshare).
func TestInstallScriptARMv7(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and unshare to bind a stand-in /proc/cpuinfo")
	}
	if out, err := exec.Command(unshare, "-m", "true").CombinedOutput(); err != nil {
		t.Skipf("unshare -m: %v %s", err, out)
	}
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	srv.publish(makeRelease(t, key, "v1.0.0", "none", []byte("agent"), false))
	dir := t.TempDir()
	scriptPath := filepath.Join(dir, "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	path := pathWithout(t, "uname")
	writeFile(t, filepath.Join(path, "uname"), []byte("#!/bin/sh\necho armv7l\n"), 0o755)
	for name, c := range map[string]struct{ cpuinfo, want string }{
		"Cortex-A53": {"processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\nCPU architecture: 7\n", "no agent for armv7"},
		"no VFPv3":   {"processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp java tls\nCPU architecture: 7\n", "no agent for armv6"},
	} {
		t.Run(name, func(t *testing.T) {
			cpuinfo := filepath.Join(t.TempDir(), "cpuinfo")
			writeFile(t, cpuinfo, []byte(c.cpuinfo), 0o644)
			cmd := exec.CommandContext(t.Context(), unshare, "-m", "sh", "-c", `mount --bind "$1" /proc/cpuinfo && shift && exec sh "$@"`,
				"sh", cpuinfo, scriptPath, "--token", "tth_x", "--services", "web=http://127.0.0.1:80", "--relay-ca", srv.CAFile, "--wait", "0")
			cmd.Env = append(os.Environ(), "PATH="+path, "TETHER_INSTALL_ROOT="+t.TempDir())
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), c.want) {
				t.Fatalf("err %v, want %q:\n%s", err, c.want, out)
			}
		})
	}
}

// TestInstallScriptNeverDowngrades: an installed agent newer than the
// relay's release (it updated itself) is kept; a newer release replaces
// it. The stand-in binaries answer --version as the agent does.
func TestInstallScriptNeverDowngrades(t *testing.T) {
	need(t, "openssl")
	arch := hostArch(t)
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	agent := func(v string) []byte {
		return []byte("#!/bin/sh\necho 'tether-agent " + v + " go1.26.8 linux/" + arch + "'\n")
	}
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	in := installer{t: t, shell: []string{"sh"}, root: t.TempDir(), script: scriptPath}
	args := []string{"--token", "tth_x", "--services", "web=http://127.0.0.1:80", "--relay-ca", srv.CAFile, "--wait", "0"}
	for _, step := range []struct{ publish, want, says string }{
		{"v2.0.0", "v2.0.0", "installed"},
		{"v1.5.0", "v2.0.0", "keeping the installed tether-agent v2.0.0: the relay's release v1.5.0 is older"},
		{"v2.0.10", "v2.0.10", "downloading tether-agent v2.0.10"},
	} {
		srv.publish(makeRelease(t, key, step.publish, arch, agent(step.publish), false))
		out, err := in.run(nil, args...)
		if err != nil || !strings.Contains(out, step.says) {
			t.Fatalf("release %s: %v, want %q", step.publish, err, step.says)
		}
		if b, _ := in.file(firmware.BinaryPath); !bytes.Equal(b, agent(step.want)) {
			t.Fatalf("release %s: installed %q, want %s", step.publish, b, step.want)
		}
		// As the agent does when it starts: the script reads this, and never
		// runs the binary (the agent's user may have rewritten it).
		writeFile(t, filepath.Join(in.root, firmware.StateDir, "version"), []byte(step.want+"\n"), 0o600)
	}
}

// TestInstallScriptHostileDevice: re-run as root on a device whose agent
// user planted links in its own directories, the script writes through
// none of them and gives none of root's files away; it never runs the
// installed binary; directories the agent reads stay readable to it; a
// release the device rolled back from is not installed again; settings it
// does not write are kept.
func TestInstallScriptHostileDevice(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: the script changes owners")
	}
	need(t, "openssl")
	arch := hostArch(t)
	key := newReleaseKey(t)
	srv := startReleaseServer(t, []string{key.pub})
	scriptPath := filepath.Join(t.TempDir(), "install.sh")
	writeFile(t, scriptPath, srv.script, 0o644)
	in := installer{t: t, shell: []string{"sh"}, root: t.TempDir(), script: scriptPath}
	os.Chmod(in.root, 0o755)
	args := []string{"--token", "tth_x", "--services", "web=http://127.0.0.1:80", "--relay-ca", srv.CAFile, "--wait", "0"}
	bin := func(v string) []byte { return []byte("#!/bin/sh\ntouch " + filepath.Join(in.root, "ran-"+v) + "\n") }
	srv.publish(makeRelease(t, key, "v1.0.0", arch, bin("v1.0.0"), false))
	if _, err := in.run(nil, args...); err != nil {
		t.Fatal(err)
	}
	// Settings of the operator's own, added since.
	envPath := filepath.Join(in.root, firmware.EnvFilePath)
	env, _ := os.ReadFile(envPath)
	writeFile(t, envPath, append(env, "TETHER_HEARTBEAT_INTERVAL=30s\nHTTPS_PROXY=http://proxy:3128\n"...), 0o600)

	// The agent's user (its uid) plants links to root's files.
	victim := filepath.Join(t.TempDir(), "victim")
	writeFile(t, victim, []byte("root's\n"), 0o600)
	victim2 := filepath.Join(t.TempDir(), "victim2")
	writeFile(t, victim2, []byte("root's too\n"), 0o600)
	state := filepath.Join(in.root, firmware.StateDir)
	if err := os.Symlink(victim, filepath.Join(state, "planted")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim2, filepath.Join(in.root, firmware.BinaryPath+".new")); err != nil {
		t.Fatal(err)
	}
	// It rolled back from v2.0.0 once (the agent's update state).
	writeFile(t, filepath.Join(state, "update.json"), []byte(`{"phase": "", "starts": 0, "preflight_starts": 0, "rolled_back": ["v2.0.0"]}`), 0o600)
	srv.publish(makeRelease(t, key, "v2.0.0", arch, bin("v2.0.0"), false))
	out, err := in.run(nil, args...)
	if err != nil || !strings.Contains(out, "rolled back from v2.0.0 before") {
		t.Fatalf("v2.0.0 after a rollback from it: %v", err)
	}
	if b, _ := in.file(firmware.BinaryPath); !bytes.Equal(b, bin("v1.0.0")) {
		t.Fatalf("installed %q after the device rolled back from v2.0.0", b)
	}
	srv.publish(makeRelease(t, key, "v2.0.1", arch, bin("v2.0.1"), false))
	if _, err := in.run(nil, args...); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{victim, victim2} {
		var st syscall.Stat_t
		if err := syscall.Stat(f, &st); err != nil || st.Uid != 0 {
			t.Errorf("%s: owner %d after the re-run (%v), want root's", f, st.Uid, err)
		}
	}
	if b, _ := os.ReadFile(victim2); string(b) != "root's too\n" {
		t.Errorf("root's file was written through a planted link: %q", b)
	}
	if b, _ := in.file(firmware.BinaryPath); !bytes.Equal(b, bin("v2.0.1")) {
		t.Errorf("installed %q, want v2.0.1", b)
	}
	if b, _ := in.file(firmware.ProvisionPath); !bytes.Equal(b, bin("v2.0.1")) {
		t.Errorf("the root-owned provisioning copy is %q, want v2.0.1", b)
	}
	for _, v := range []string{"v1.0.0", "v2.0.0", "v2.0.1"} {
		if in.exists("ran-" + v) {
			t.Errorf("the script ran the agent binary %s as root", v)
		}
	}
	for _, d := range []string{"/etc/tether", "/opt/tether-agent", "/usr/lib/tether-agent", "/opt", "/usr/lib"} {
		if st, err := os.Stat(filepath.Join(in.root, d)); err != nil || st.Mode().Perm()&0o005 != 0o005 {
			t.Errorf("%s: %v %v, want others to enter and read it", d, st.Mode(), err)
		}
	}
	if _, mode := in.file("/etc/tether/relay-ca.pem"); mode.Perm() != 0o644 {
		t.Errorf("relay-ca.pem mode %v", mode)
	}
	if env, _ := in.file(firmware.EnvFilePath); !strings.Contains(string(env), "TETHER_HEARTBEAT_INTERVAL=30s\nHTTPS_PROXY=http://proxy:3128\n") {
		t.Errorf("the re-run dropped the operator's settings:\n%s", env)
	}
}
