package main

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/tetherfleet/tether/agent/bootenv"
	"github.com/tetherfleet/tether/frames"
)

// provision runs before the settings are parsed. `tether-agent provision`
// (the unit's ExecStartPre, as root and outside the sandbox) consumes the
// boot partition's tether.env into the state dir and returns done. Every
// other start consumes it too when it can (an agent run without systemd),
// then takes the provisioned settings its environment leaves unset or
// empty: /etc/tether/agent.env wins over the card.
func provision(args []string, stdout, stderr io.Writer) (done bool, err error) {
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" || a == "--version" || a == "-version" {
			return false, nil
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	stateDir := os.Getenv("TETHER_STATE_DIR")
	if stateDir == "" {
		stateDir = defaultStateDir()
	}
	var dirs []string
	if d := os.Getenv("TETHER_BOOT_DIRS"); d != "" {
		dirs = strings.Split(d, ",")
	}
	sub := len(args) > 0 && args[0] == "provision"
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
	path := filepath.Join(stateDir, leasesFile)
	tmp := path + ".tmp"
	err := os.WriteFile(tmp, b.Bytes(), 0o600)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		log.Warn("record leases", "file", path, "err", err)
	}
}
