// Package packages builds the agent's .deb and .apk packages with
// nFPM (github.com/goreleaser/nfpm/v2, as a library): the binary at
// /opt/tether-agent/tether-agent, the hardened unit, a default
// /etc/tether/agent.env (a config file the package never overwrites), and
// maintainer scripts that create the user "tether" and enable the unit
// but start the agent only when it can enroll or is enrolled.
package packages

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/apk"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
	"github.com/tetherfleet/tether/firmware"
)

//go:embed postinstall.sh
var postInstall []byte

//go:embed preremove.sh
var preRemove []byte

//go:embed postremove.sh
var postRemove []byte

// UnitPath is where the packages put the unit (systemd reads
// /usr/lib/systemd/system on merged-/usr and older systems alike).
const UnitPath = "/usr/lib/systemd/system/" + firmware.UnitName

// Formats are the package formats Build makes by default.
// (.rpm is left out: nFPM's RPM writer needs go.digitalxero.dev/rpm,
// which the module proxy refuses.)
var Formats = []string{"deb", "apk"}

// Options configures Build.
type Options struct {
	// DistDir holds the agent binaries as make cross names them
	// (tether-agent-linux-ARCH). Required.
	DistDir string
	// OutDir receives the packages. Required.
	OutDir string
	// Arches are the agent architectures (cross.Target.Arch names: armv6,
	// armv7, arm64, amd64, riscv64, mipsle). Required.
	Arches []string
	// Formats to build; nil means Formats.
	Formats []string
	// Version is the release (v1.4.0, or git describe's output). Empty
	// means 0.0.0; one that is not a version becomes 0.0.0~VERSION.
	Version string
}

// Build makes one package per format and arch and returns their paths,
// named tether-agent_VERSION_ARCH.FORMAT with Tether's arch names (armv6
// and armv7 are both Debian's armhf).
func Build(ctx context.Context, o Options) ([]string, error) {
	if o.DistDir == "" || o.OutDir == "" || len(o.Arches) == 0 {
		return nil, errors.New("packages: DistDir, OutDir and Arches are required")
	}
	if o.Formats == nil {
		o.Formats = Formats
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}
	// nFPM reads every source from a file.
	src, err := os.MkdirTemp("", "tether-packages-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(src)
	for name, b := range map[string][]byte{
		"unit": firmware.Unit(), "agent.env": firmware.AgentEnv(),
		"postinstall.sh": postInstall, "preremove.sh": preRemove, "postremove.sh": postRemove,
	} {
		if err := os.WriteFile(filepath.Join(src, name), b, 0o644); err != nil {
			return nil, err
		}
	}
	version := PackageVersion(o.Version)
	var out []string
	for _, arch := range o.Arches {
		bin := filepath.Join(o.DistDir, "tether-agent-linux-"+arch)
		st, err := os.Stat(bin)
		if err != nil {
			return out, fmt.Errorf("packages: %w (run make cross first)", err)
		}
		for _, format := range o.Formats {
			if err := ctx.Err(); err != nil {
				return out, err
			}
			path := filepath.Join(o.OutDir, fmt.Sprintf("tether-agent_%s_%s.%s", version, arch, format))
			info := info(src, bin, arch, version)
			info.MTime = st.ModTime()
			if err := write(path, format, info); err != nil {
				return out, fmt.Errorf("packages: %s %s: %w", format, arch, err)
			}
			out = append(out, path)
		}
	}
	return out, nil
}

func write(path, format string, info *nfpm.Info) error {
	var p nfpm.Packager
	switch format {
	case "deb":
		p = deb.Default
	case "apk":
		p = apk.Default
	default:
		return fmt.Errorf("unknown format %q (deb or apk)", format)
	}
	info = nfpm.WithDefaults(info)
	info.Target = path
	if err := nfpm.PrepareForPackager(info, format); err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := p.Package(info, &buf); err != nil {
		return err
	}
	return writeFile(path, &buf)
}

func writeFile(path string, r io.Reader) error {
	f, err := os.Create(path + ".tmp")
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(path+".tmp", path)
	}
	return err
}

// nfpmArch is nFPM's name for an arch (it maps it per format: arm7 is
// armhf in a .deb and armv7hl in an .rpm).
func nfpmArch(arch string) string {
	if v, ok := strings.CutPrefix(arch, "armv"); ok {
		return "arm" + v
	}
	return arch
}

func info(src, bin, arch, version string) *nfpm.Info {
	root := func(mode os.FileMode) *files.ContentFileInfo {
		return &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode}
	}
	return &nfpm.Info{
		Name:        "tether-agent",
		Arch:        nfpmArch(arch),
		Platform:    "linux",
		Version:     version,
		Section:     "net",
		Priority:    "optional",
		Maintainer:  "Tether <tether@localhost>",
		Description: "Tether agent: publishes this device's services through a Tether relay over one outbound connection",
		Homepage:    "https://github.com/tetherfleet/tether",
		License:     "Apache-2.0",
		Overridables: nfpm.Overridables{
			Contents: files.Contents{
				{Type: files.TypeDir, Destination: "/opt/tether-agent", FileInfo: root(0o755)},
				{Source: bin, Destination: firmware.BinaryPath, FileInfo: root(0o755)},
				{Type: files.TypeDir, Destination: "/usr/lib/tether-agent", FileInfo: root(0o755)},
				{Source: bin, Destination: firmware.ProvisionPath, FileInfo: root(0o755)},
				{Source: filepath.Join(src, "unit"), Destination: UnitPath, FileInfo: root(0o644)},
				{Type: files.TypeDir, Destination: "/etc/tether", FileInfo: root(0o755)},
				{Source: filepath.Join(src, "agent.env"), Destination: firmware.EnvFilePath, Type: files.TypeConfigNoReplace, FileInfo: root(0o600)},
			},
			Scripts: nfpm.Scripts{
				PostInstall: filepath.Join(src, "postinstall.sh"),
				PreRemove:   filepath.Join(src, "preremove.sh"),
				PostRemove:  filepath.Join(src, "postremove.sh"),
			},
		},
	}
}

var semverish = regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+([-+~][0-9A-Za-z.+~-]*)?$`)

// PackageVersion turns a release or git describe version into a package
// version: v1.4.0 -> 1.4.0; anything else (a commit hash) -> 0.0.0~hash.
func PackageVersion(v string) string {
	v = strings.TrimPrefix(v, "v")
	switch {
	case v == "", v == "dev":
		return "0.0.0"
	case semverish.MatchString(v):
		return v
	}
	return "0.0.0~" + regexp.MustCompile(`[^0-9A-Za-z.]+`).ReplaceAllString(v, ".")
}
