// Command tether-agent runs on a device: it holds one outbound session to a
// Tether relay and publishes the device's local services through it.
//
// Exit status: 0 after SIGINT/SIGTERM; 1 for bad settings or I/O errors;
// 3 when the device was revoked; 4 when enrollment was refused or the device
// is not enrolled. A supervisor should not restart it on 3 or 4
// (systemd: RestartPreventExitStatus=3 4).
//
// `tether-agent preflight` is the update rollback check systemd runs from
// the previous binary before each start (ExecStartPre=-NAME.prev
// preflight): see package agent/update.
//
// `tether-agent provision` takes a boot-partition tether.env into the state
// dir (the unit runs it as root before each start): see agent/bootenv.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/tetherfleet/tether/agent"
	"github.com/tetherfleet/tether/agent/update"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/cli"
)

var version = "dev"

// crashAtStart is a test-only build knob (-ldflags "-X
// main.crashAtStart=yes"): the binary exits 1 at once, as a release that
// cannot even start would. The update tests build one to watch it roll
// back. Never set in a release.
var crashAtStart string

const about = `tether-agent: publishes this device's local services through a Tether relay over one
outbound wss:// connection. First start: set TETHER_ENROLL_TOKEN; the device key is made here and
kept in TETHER_STATE_DIR (mode 0600); later starts need no token. Updates offered by the relay are
taken only when signed by TETHER_RELEASE_KEYS; "tether-agent preflight" (systemd runs it from
tether-agent.prev before each start) puts the previous binary back if a new one does not come up.`

type spec struct {
	RelayURL          string        `split_words:"true" required:"true" desc:"wss://relay.example.com (comma-separated: failover candidates)"`
	EnrollToken       string        `split_words:"true" desc:"enrollment token (tth_...), used once on first start"`
	EnrollTokenFile   string        `split_words:"true" desc:"file holding the enrollment token"`
	StateDir          string        `split_words:"true" desc:"device key and enrollment record; empty: /var/lib/tether-agent as root, else ~/.local/state/tether-agent"`
	DeviceName        string        `split_words:"true" desc:"requested device name; empty: the hostname (suffixed on a clash)"`
	Services          string        `split_words:"true" required:"true" desc:"web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22; a tcp service may add ?idle=10m (10s..24h): the relay closes its public connections after that long without a byte"`
	RelayCA           string        `split_words:"true" desc:"PEM file of the CA to trust for the relay (self-hosted/dev); empty: system roots"`
	HeartbeatInterval time.Duration `split_words:"true" default:"15s" desc:"heartbeat period; the relay is declared dead after 3 silent intervals"`
	Insecure          bool          `split_words:"true" desc:"allow ws:// relay URLs (no TLS; the enrollment token travels in cleartext): closed test networks only"`
	LogFormat         string        `split_words:"true" default:"auto" desc:"auto (text on a terminal, else json), text or json"`
	LogLevel          string        `split_words:"true" default:"info" desc:"debug, info, warn or error"`
	BootDirs          string        `split_words:"true" default:"/boot/firmware,/boot" desc:"where a boot-partition tether.env is looked for, comma-separated (taken once; see tether-agent provision)"`
	ReleaseKeys       string        `split_words:"true" desc:"minisign public keys (RW..., comma-separated) that agent releases must be signed with; empty: every update is refused"`
	UpdateDeadline    time.Duration `split_words:"true" default:"2m" desc:"a new agent version must connect and pass its first heartbeats within this time of the swap, else the previous binary comes back"`
	UpdateRate        int           `split_words:"true" default:"1048576" desc:"most bytes per second an update download takes"`
}

// preflightSpec is the settings of tether-agent preflight.
type preflightSpec struct {
	StateDir  string `split_words:"true" desc:"where update.json is; empty: as tether-agent"`
	LogFormat string `split_words:"true" default:"auto" desc:"auto (text on a terminal, else json), text or json"`
	LogLevel  string `split_words:"true" default:"info" desc:"debug, info, warn or error"`
}

const aboutPreflight = `tether-agent preflight: the update rollback check systemd runs from the previous binary
(tether-agent.prev) before each start of the agent. With an update pending, it counts the start and
puts the previous binary back past 3 starts, or past the deadline, without the new version healthy.`

// Exit statuses.
const (
	exitRevoked  = 3
	exitRefused  = 4
	exitSettings = 1
)

func main() {
	if crashAtStart != "" {
		fmt.Fprintln(os.Stderr, "tether-agent: built to crash at start (test build)")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout)
	switch {
	case err == nil, errors.Is(err, cli.ErrHelp):
		return
	case errors.Is(err, agent.ErrRevoked):
		fmt.Fprintln(os.Stderr, "tether-agent:", err)
		os.Exit(exitRevoked)
	case errors.Is(err, agent.ErrNotEnrolled), errors.Is(err, agent.ErrUnauthorized), errors.As(err, new(*agent.EnrollError)):
		fmt.Fprintln(os.Stderr, "tether-agent:", err)
		os.Exit(exitRefused)
	default:
		fmt.Fprintln(os.Stderr, "tether-agent:", err)
		os.Exit(exitSettings)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == "preflight" {
		return preflight(args[1:], stdout)
	}
	if done, err := provision(args, stdout, os.Stderr); done || err != nil {
		return err
	}
	var s spec
	unknown, err := cli.Parse("tether-agent", version, about, &s, args, stdout)
	if err != nil {
		return err
	}
	log, err := cli.Logger(os.Stderr, s.LogFormat, s.LogLevel)
	if err != nil {
		return err
	}
	cli.WarnUnknown(log, unknown)
	services, err := agent.ParseServices(s.Services)
	if err != nil {
		return fmt.Errorf("TETHER_SERVICES: %w", err)
	}
	token, err := cli.Secret(s.EnrollToken, s.EnrollTokenFile)
	if errors.Is(err, fs.ErrNotExist) && s.EnrollToken == "" {
		token, err = "", nil // removed once used (forgetToken): needed no more if enrolled
	}
	if err != nil {
		return err
	}
	var roots *x509.CertPool
	if s.RelayCA != "" {
		pem, err := os.ReadFile(s.RelayCA)
		if err != nil {
			return fmt.Errorf("TETHER_RELAY_CA: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("TETHER_RELAY_CA: no certificate in %s", s.RelayCA)
		}
	}
	if s.StateDir == "" {
		s.StateDir = defaultStateDir()
	}
	keys, err := release.ParseKeys(strings.Split(s.ReleaseKeys, ","))
	if err != nil {
		return fmt.Errorf("TETHER_RELEASE_KEYS: %w", err)
	}
	upd, err := update.New(update.Config{StateDir: s.StateDir, Version: version, Deadline: s.UpdateDeadline,
		Hook: testPause(os.Getenv(testPauseEnv)), Logger: log})
	if err != nil {
		return err
	}
	// A new version that keeps failing, or a rollback a power cut
	// interrupted: the previous binary is put back and run.
	if err := upd.Startup(); errors.Is(err, update.ErrRestart) {
		return update.Exec(upd.Binary())
	} else if err != nil {
		log.Warn("agent update state", "err", err)
	}
	a, err := agent.New(agent.Config{
		RelayURLs:         strings.Split(s.RelayURL, ","),
		EnrollToken:       token,
		StateDir:          s.StateDir,
		DeviceName:        s.DeviceName,
		Services:          services,
		RootCAs:           roots,
		HeartbeatInterval: s.HeartbeatInterval,
		Proxy:             http.ProxyFromEnvironment,
		// Each time the relay assigns names the session is up: give the
		// memory of the TLS handshake and enrollment back to the OS, so an
		// idle agent stays small on a Pi Zero.
		OnLeases: func(ls []frames.Lease) {
			debug.FreeOSMemory()
			writeLeases(log, s.StateDir, ls)
			writeStateFile(log, s.StateDir, versionFile, []byte(version+"\n")) // the state dir exists now
			forgetToken(log, s.StateDir, s.EnrollTokenFile)
		},
		Insecure:    s.Insecure,
		Version:     version,
		Updater:     upd,
		ReleaseKeys: keys,
		UpdateRate:  s.UpdateRate,
		Logger:      log,
	})
	if err != nil {
		return err
	}
	err = a.Run(ctx)
	if errors.Is(err, update.ErrRestart) {
		log.Info("restarting into the agent binary", "path", upd.Binary())
		return update.Exec(upd.Binary())
	}
	return err
}

// preflight runs update.Preflight for the binary this one is the .prev of.
func preflight(args []string, stdout io.Writer) error {
	var s preflightSpec
	unknown, err := cli.Parse("tether-agent preflight", version, aboutPreflight, &s, args, stdout)
	if err != nil {
		return err
	}
	log, err := cli.Logger(os.Stderr, s.LogFormat, s.LogLevel)
	if err != nil {
		return err
	}
	cli.WarnUnknown(log, unknown)
	if s.StateDir == "" {
		s.StateDir = defaultStateDir()
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	if exe, err = filepath.EvalSymlinks(exe); err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	return update.Preflight(strings.TrimSuffix(exe, ".prev"), s.StateDir, 0, log)
}

func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/tether-agent"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "tether-agent")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "tether-agent")
}
