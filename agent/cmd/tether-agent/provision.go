package main

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/tetherfleet/tether/agent/bootenv"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/cli"
	"github.com/tetherfleet/tether/frames/secretfile"
)

const aboutProvision = `tether-agent provision: takes a tether.env from the boot partition (the first found in
TETHER_BOOT_DIRS, default /boot/firmware then /boot) into TETHER_STATE_DIR once: the token to
enroll-token, the other settings to provisioned.env (both 0600), then removes the file from the card.
The systemd unit runs it as root before each start of the agent. See firmware/README.md.`

// provision runs before the settings are parsed. `tether-agent provision`
// (the unit's ExecStartPre, as root and outside the sandbox) consumes the
// boot partition's tether.env into the state dir and returns done. Every
// other start consumes it too when it can (an agent run without systemd),
// then takes the provisioned settings its environment leaves unset or
// empty: /etc/tether/agent.env wins over the card.
func provision(args []string, stdout io.Writer, stderr *os.File) (done bool, err error) {
	sub := len(args) > 0 && args[0] == "provision"
	if sub {
		args = args[1:]
	}
	if setting(args, "help", "") != "" || setting(args, "h", "") != "" || setting(args, "version", "") != "" {
		if sub {
			fmt.Fprintln(stdout, aboutProvision)
		}
		return sub, nil // else the settings' parse prints them
	}
	log, err := cli.Logger(stderr, cmp.Or(setting(args, "log-format", "TETHER_LOG_FORMAT"), "auto"),
		cmp.Or(setting(args, "log-level", "TETHER_LOG_LEVEL"), "info"))
	if err != nil {
		log = slog.New(slog.NewTextHandler(stderr, nil)) // the settings' parse says why
	}
	stateDir := setting(args, "state-dir", "TETHER_STATE_DIR")
	if stateDir == "" {
		stateDir = defaultStateDir()
	}
	var dirs []string
	if d := setting(args, "boot-dirs", "TETHER_BOOT_DIRS"); d != "" {
		dirs = strings.Split(d, ",")
	}
	res, err := bootenv.Consume(bootenv.Config{BootDirs: dirs, StateDir: stateDir, Logger: log})
	if sub {
		switch {
		case err != nil:
			return true, fmt.Errorf("provision: %w", err)
		case res.Path == "":
			fmt.Fprintln(stdout, "tether-agent provision: no", bootenv.FileName, "in", strings.Join(orDefault(dirs), " or "))
		case res.Consumed:
			fmt.Fprintln(stdout, "tether-agent provision: took the settings of", res.Path, "into", stateDir)
		}
		return true, nil
	}
	if err != nil {
		log.Warn("boot-partition provisioning", "err", err)
	}
	settings, err := bootenv.Load(stateDir)
	if err != nil {
		return false, err
	}
	for _, s := range settings {
		if os.Getenv(s.Key) == "" {
			if err := os.Setenv(s.Key, s.Value); err != nil {
				return false, err
			}
		}
	}
	return false, nil
}

// setting returns a flag's value in args (--name V, --name=V; a flag
// alone is "true"), else the variable env's: provisioning runs before
// the settings are parsed, by the same rules.
func setting(args []string, flag, env string) string {
	for i, a := range args {
		if !strings.HasPrefix(a, "-") {
			break
		}
		key, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch {
		case key != flag:
		case hasVal:
			return val
		case i+1 < len(args) && !strings.HasPrefix(args[i+1], "-"):
			return args[i+1]
		default:
			return "true"
		}
	}
	if env == "" {
		return ""
	}
	return os.Getenv(env)
}

func orDefault(dirs []string) []string {
	if dirs == nil {
		return bootenv.DefaultBootDirs()
	}
	return dirs
}

// leasesFile is where the agent keeps the names the relay gave it, one
// "SERVICE PROTO HOSTNAME-OR-PORT" line each: install.sh prints the
// device's URLs from it once the agent is connected.
const leasesFile = "leases"

// writeLeases records the leases in the state dir (atomically, 0600).
func writeLeases(log *slog.Logger, stateDir string, ls []frames.Lease) {
	var b bytes.Buffer
	for _, l := range ls {
		if l.Hostname != "" {
			fmt.Fprintf(&b, "%s %s %s\n", l.Service, l.Proto, l.Hostname)
		} else {
			fmt.Fprintf(&b, "%s %s %d\n", l.Service, l.Proto, l.Port)
		}
	}
	writeStateFile(log, stateDir, leasesFile, b.Bytes())
}

// versionFile holds the running agent's version: install.sh reads it
// (it never runs the agent's binary, which the agent's user may rewrite).
const versionFile = "version"

// forgetToken removes the enrollment token file once the device is
// enrolled and connected, when it is the agent's own copy in its state
// dir (install.sh's, a boot partition's): a used token left on the device
// would enroll another one.
func forgetToken(log *slog.Logger, stateDir, tokenFile string) {
	if tokenFile == "" || filepath.Dir(filepath.Clean(tokenFile)) != filepath.Clean(stateDir) {
		return
	}
	if err := os.Remove(tokenFile); err == nil {
		log.Info("enrollment token removed: the device is enrolled", "file", tokenFile)
	} else if !errors.Is(err, fs.ErrNotExist) {
		log.Warn("remove the used enrollment token", "file", tokenFile, "err", err)
	}
}

// writeStateFile writes name in the state dir atomically (0600); a
// failure is logged, not fatal.
func writeStateFile(log *slog.Logger, stateDir, name string, data []byte) {
	if err := secretfile.Write(filepath.Join(stateDir, name), data); err != nil {
		log.Warn("write a state file", "err", err)
	}
}
