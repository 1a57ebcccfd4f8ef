// Command tetherctl is the operator's CLI for a Tether control plane: it
// creates enrollment tokens, lists devices, leases and live relays,
// revokes devices, signs and publishes agent releases and runs rollouts,
// over the admin API.
//
// It exits 0 on success, 1 on an error, and 2 when a revocation is stored
// but not yet confirmed by every live relay.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/httpapi"
	"github.com/tetherfleet/tether/frames/cli"
)

var version = "dev"

const about = `tetherctl: operate a Tether control plane.

Commands:
  token create [--uses N] [--ttl 24h] [--label k=v]...   print a new enrollment token
  devices [--json]                                        list devices
  leases [--json]                                         list leases (hostname or port, device, service, relay, online)
  relays [--json]                                         list the live relays
  revoke DEVICE                                           cut a device off cluster-wide; it cannot reconnect
                                                          (exit status 2: not yet confirmed by every live relay)
  lease release HOSTNAME|PORT                             free a lease no service uses now; nobody may take it during
                                                          the quarantine (TETHER_LEASE_QUARANTINE, default 7 days)
  device delete DEVICE [--keep-names]                     revoke and delete a device; its names go into quarantine
                                                          (or stay taken with --keep-names)
  device replace DEVICE [--ttl 24h]                       revoke a device and print a one-use token with which a new
                                                          device (new key) takes over its name, labels and leases
  provision --token T --relay URL --services LIST [--name N] [--boot DIR]
                                                          write tether.env for a device's SD card (no control plane needed)
  release keygen [--dir DIR]                              make a release signing key pair (tether-release.key, .pub)
  release sign --key FILE --version vX.Y.Z [--min-version V] [--floor V] DIST
                                                          write DIST/manifest.json and its .minisig for make cross's agents
  release publish DIST                                    upload a signed release (manifest, signature, binaries)
  releases [--json]                                       list published releases
  rollout start VERSION [--labels k=v,...] [--percent N]  offer a release to N% (default 100) of the devices with the labels
  rollout set-percent N                                   change the rollout's percent (devices already chosen stay)
  rollout status [--json]                                 devices per version and update state
  rollout pause|resume|abort                              stop or resume offering; abort ends the rollout`

type spec struct {
	AdminURL       string `split_words:"true" default:"http://127.0.0.1:7070" desc:"admin API of the control plane (or standalone relay)"`
	AdminToken     string `split_words:"true" desc:"admin bearer token; empty: read ADMIN_TOKEN_FILE"`
	AdminTokenFile string `split_words:"true" desc:"file holding the admin token; empty: <data dir>/admin-token"`
	DataDir        string `split_words:"true" default:"./tether-data" desc:"data dir of a local standalone relay, where it writes admin-token"`
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, cli.ErrHelp) {
			return
		}
		var ex exitStatus
		if errors.As(err, &ex) {
			os.Exit(int(ex))
		}
		fmt.Fprintln(os.Stderr, "tetherctl:", err)
		os.Exit(1)
	}
}

// exitStatus ends tetherctl with a status after its output said why.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// statusUnconfirmed is the exit status of a revocation that not every
// live relay confirmed.
const statusUnconfirmed exitStatus = 2

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var s spec
	if len(args) > 0 && args[0] == "help" {
		args[0] = "--help"
	}
	args, unknown, err := cli.ParseCommand("tetherctl", version, about, &s, args, stdout)
	if err != nil {
		return err
	}
	if len(args) == 0 {
		cli.Usage(stderr, "tetherctl [flags] COMMAND", about, &s)
		return errors.New("no command")
	}
	if args[0] == "version" {
		fmt.Fprintln(stdout, cli.Version("tetherctl", version))
		return nil
	}
	for _, u := range unknown {
		fmt.Fprintln(stderr, "tetherctl: warning:", u)
	}
	if args[0] == "provision" {
		return provisionCmd(args[1:], stdout, stderr)
	}
	if args[0] == "release" {
		if ok, err := releaseOffline(args[1:], stdout, stderr); ok {
			return err
		}
	}
	if s.AdminTokenFile == "" {
		s.AdminTokenFile = filepath.Join(s.DataDir, "admin-token")
	}
	token, err := cli.Secret(s.AdminToken, s.AdminTokenFile)
	if err != nil {
		if s.AdminToken == "" && errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("no admin token: set TETHER_ADMIN_TOKEN, or TETHER_ADMIN_TOKEN_FILE (tried %s)", filepath.Clean(s.AdminTokenFile))
		}
		return err
	}
	c := &httpapi.Client{BaseURL: s.AdminURL, Token: token}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "token":
		if len(rest) == 0 || rest[0] != "create" {
			return errors.New("usage: tetherctl token create [--uses N] [--ttl 24h] [--label k=v]")
		}
		return tokenCreate(ctx, c, rest[1:], stdout, stderr)
	case "devices":
		return list(ctx, rest, stdout, "devices", c.Devices, printDevices)
	case "leases":
		return list(ctx, rest, stdout, "leases", c.Leases, printLeases)
	case "relays":
		return list(ctx, rest, stdout, "relays", c.Relays, printRelays)
	case "release":
		return releaseCmd(ctx, c, rest, stdout, stderr)
	case "releases":
		return list(ctx, rest, stdout, "releases", c.Releases, printReleases)
	case "rollout":
		return rolloutCmd(ctx, c, rest, stdout, stderr)
	case "device":
		return deviceCmd(ctx, c, rest, stdout, stderr)
	case "lease":
		if len(rest) != 2 || rest[0] != "release" {
			return errors.New("usage: tetherctl lease release HOSTNAME|PORT")
		}
		l, err := c.ReleaseLease(ctx, rest[1])
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "released %s (service %s of device %s); in quarantine before anyone may take it\n", leaseName(l), l.Service, l.DeviceName)
		return nil
	case "revoke":
		if len(rest) != 1 {
			return errors.New("usage: tetherctl revoke DEVICE")
		}
		res, err := c.Revoke(ctx, rest[0])
		if err != nil {
			return err
		}
		if !printRevoke(stdout, res) {
			return statusUnconfirmed
		}
		return nil
	}
	return fmt.Errorf("unknown command %q (see tetherctl --help)", cmd)
}

// labels collects repeated --label k=v flags.
type labels map[string]string

func (l labels) String() string { return fmt.Sprint(map[string]string(l)) }
func (l labels) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("label %q: want key=value", v)
	}
	l[k] = val
	return nil
}

func tokenCreate(ctx context.Context, c *httpapi.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("token create", flag.ContinueOnError)
	fs.SetOutput(stderr)
	uses := fs.Int("uses", 1, "how many devices the token may enroll")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token is valid")
	lbls := labels{}
	fs.Var(lbls, "label", "key=value given to devices it enrolls (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	resp, err := c.CreateToken(ctx, httpapi.CreateTokenRequest{Uses: *uses, TTL: ttl.String(), Labels: lbls})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, resp.Secret)
	fmt.Fprintf(stderr, "token %s: %d use(s), expires %s; shown once\n", resp.ID, resp.Uses, resp.ExpiresAt.Local().Format(time.RFC3339))
	return nil
}

// list prints what fetch returns, as a table or with --json as JSON.
func list[T any](ctx context.Context, args []string, w io.Writer, name string, fetch func(context.Context) (T, error), table func(io.Writer, T)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	v, err := fetch(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, v)
	}
	table(w, v)
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printDevices(w io.Writer, ds []controlplane.Device) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tSTATUS\tRELAY\tSERVICES\tLABELS\tLAST SEEN")
	for _, d := range ds {
		status := "offline"
		switch {
		case d.Revoked:
			status = "revoked"
		case d.Online:
			status = "online"
		}
		if d.CloneSuspected {
			status += " (cloned key?)"
		}
		var svcs, lbls []string
		for _, s := range d.Services {
			svcs = append(svcs, s.Name+"/"+s.Proto)
		}
		for k, v := range d.Labels {
			lbls = append(lbls, k+"="+v)
		}
		slices.Sort(lbls)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Name, d.ID, status, dash(d.Relay), dash(strings.Join(svcs, ",")),
			dash(strings.Join(lbls, ",")), ago(d.LastSeen))
	}
	tw.Flush()
}

func printLeases(w io.Writer, ls []controlplane.Lease) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOSTNAME/PORT\tDEVICE\tSERVICE\tPROTO\tRELAY\tONLINE\tNOTE")
	for _, l := range ls {
		name := leaseName(l)
		note := ""
		if len(l.UnboundOn) > 0 {
			note = "unbound on " + strings.Join(l.UnboundOn, ", ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\t%s\n", name, l.DeviceName, l.Service, l.Proto, dash(l.Relay), l.Online, dash(note))
	}
	tw.Flush()
}

// leaseName is a lease's hostname, or "port N".
func leaseName(l controlplane.Lease) string {
	if l.Port != 0 {
		return fmt.Sprintf("port %d", l.Port)
	}
	return l.Hostname
}

func printRelays(w io.Writer, rs []controlplane.RelayInfo) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCLUSTER ADDR\tSESSIONS\tPUBLIC NAMES\tUNBOUND PORTS\tLAST HELLO")
	for _, r := range rs {
		var ports []string
		for _, p := range r.UnboundPorts {
			ports = append(ports, strconv.Itoa(int(p)))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", r.ID, dash(r.ClusterAddr), r.Sessions,
			dash(strings.Join(r.PublicNames, ",")), dash(strings.Join(ports, ",")), ago(r.LastSeen))
	}
	tw.Flush()
}

// printRevoke says what a revocation achieved, and reports whether every
// live relay confirmed it. It says "cut off" only then.
func printRevoke(w io.Writer, res controlplane.RevokeResult) bool {
	d := res.Device
	switch {
	case res.Undelivered != "":
		fmt.Fprintf(w, "revoked %s (%s) in the control plane; NATS is unreachable, so no relay was told (%s): each applies the revocation when it reaches the control plane again\n",
			d.Name, d.ID, res.Undelivered)
		if len(res.Pending) > 0 {
			fmt.Fprintf(w, "not yet confirmed by %s\n", relayList(res.Pending))
		}
		return false
	case len(res.Pending) > 0:
		applies, reaches := "it applies", "it reaches"
		if len(res.Pending) > 1 {
			applies, reaches = "they apply", "they reach"
		}
		fmt.Fprintf(w, "revoked %s (%s) in the control plane; not yet confirmed by %s: %s the revocation when %s the control plane again\n",
			d.Name, d.ID, relayList(res.Pending), applies, reaches)
		if len(res.Confirmed) > 0 {
			fmt.Fprintf(w, "confirmed by %s\n", relayList(res.Confirmed))
		}
		return false
	case len(res.Confirmed) > 0:
		fmt.Fprintf(w, "revoked %s (%s): cut off: confirmed by every live relay (%s)\n", d.Name, d.ID, strings.Join(res.Confirmed, ", "))
	default:
		fmt.Fprintf(w, "revoked %s (%s): no relay is live, so none serves it; every relay refuses it when it reaches the control plane\n", d.Name, d.ID)
	}
	return true
}

// relayList is "relay a" or "relays a, b".
func relayList(ids []string) string {
	if len(ids) == 1 {
		return "relay " + ids[0]
	}
	return "relays " + strings.Join(ids, ", ")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}
