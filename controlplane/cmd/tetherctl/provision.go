package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
)

const provisionUsage = `usage: tetherctl provision --token tth_... --relay wss://RELAY --services LIST [--name NAME] [--release-keys RW...] [--boot DIR]

Writes tether.env for a device's SD card: --boot is the card's mounted boot
partition (default: the current directory). At its first start the agent takes
the settings into its state dir and deletes the file from the card.`

// provisionCmd writes a boot-partition tether.env (agent/bootenv reads it).
// It needs no control plane, so it runs before the admin token is read.
func provisionCmd(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("tetherctl provision", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprintln(stderr, provisionUsage) }
	token := fs.String("token", "", "enrollment token (tetherctl token create)")
	relay := fs.String("relay", "", "relay URL, wss://HOST[:PORT] (https:// is taken as wss://); comma-separated: failover candidates")
	services := fs.String("services", "", "NAME=http://HOST:PORT,NAME=tcp://HOST:PORT")
	name := fs.String("name", "", "requested device name; empty: the device's hostname")
	keys := fs.String("release-keys", "", "release public keys (RW..., comma-separated) the agent trusts for updates")
	boot := fs.String("boot", ".", "the card's mounted boot partition")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("provision: unexpected argument %q\n%s", fs.Arg(0), provisionUsage)
	}
	env, err := provisionFile(*token, *relay, *services, *name, *keys)
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	if st, err := os.Stat(*boot); err != nil || !st.IsDir() {
		return fmt.Errorf("provision: --boot %s is not a directory (mount the card's boot partition)", *boot)
	}
	path := filepath.Join(*boot, "tether.env")
	if err := os.WriteFile(path, env, 0o600); err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %s: the device enrolls at its first start and deletes it\n", path)
	return nil
}

// provisionFile checks the settings and renders tether.env.
func provisionFile(token, relay, services, name, keys string) ([]byte, error) {
	if !strings.HasPrefix(token, "tth_") {
		return nil, errors.New("--token: want an enrollment token tth_... (tetherctl token create)")
	}
	var relays []string
	for r := range strings.SplitSeq(relay, ",") {
		u, err := url.Parse(strings.TrimSpace(r))
		if err != nil || u.Host == "" || (u.Scheme != "wss" && u.Scheme != "https") {
			return nil, fmt.Errorf("--relay %q: want wss://HOST[:PORT]", r)
		}
		u.Scheme, u.Path = "wss", ""
		relays = append(relays, u.String())
	}
	if err := checkServices(services); err != nil {
		return nil, fmt.Errorf("--services: %w", err)
	}
	if name != "" {
		if err := frames.ValidDeviceName(name); err != nil {
			return nil, fmt.Errorf("--name: %w", err)
		}
	}
	lines := []string{"# Tether device settings, written by tetherctl provision. The agent takes them",
		"# at its first start and deletes this file (it holds an enrollment token).",
		"TETHER_RELAY_URL=" + strings.Join(relays, ","),
		"TETHER_ENROLL_TOKEN=" + token,
		"TETHER_SERVICES=" + services}
	if name != "" {
		lines = append(lines, "TETHER_DEVICE_NAME="+name)
	}
	if keys != "" {
		if _, err := release.ParseKeys(strings.Split(keys, ",")); err != nil {
			return nil, fmt.Errorf("--release-keys: %w", err) // the agent would refuse to start
		}
		lines = append(lines, "TETHER_RELEASE_KEYS="+keys)
	}
	for _, l := range lines {
		if strings.ContainsFunc(l, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '"' || r == '\'' }) {
			return nil, fmt.Errorf("a value holds a quote or a control character: %q", l)
		}
	}
	return []byte(strings.Join(lines, "\n") + "\n"), nil
}

// checkServices checks NAME=PROTO://HOST:PORT entries as the agent will.
func checkServices(list string) error {
	if strings.TrimSpace(list) == "" {
		return errors.New("no services: e.g. web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22")
	}
	for entry := range strings.SplitSeq(list, ",") {
		n, raw, ok := strings.Cut(strings.TrimSpace(entry), "=")
		if !ok {
			return fmt.Errorf("%q: want NAME=PROTO://HOST:PORT", entry)
		}
		if err := frames.ValidServiceName(n); err != nil {
			return fmt.Errorf("%q: %w", entry, err)
		}
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "tcp") || u.Port() == "" {
			return fmt.Errorf("%q: want http://HOST:PORT or tcp://HOST:PORT", entry)
		}
	}
	return nil
}
