package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/tetherfleet/tether/controlplane/httpapi"
)

// deviceCmd runs "device delete NAME [--keep-names]" and "device replace
// OLD [--ttl 24h]". Both revoke the device first (cluster-wide) if it is
// not revoked yet; exit status 2 when a relay has not confirmed that.
func deviceCmd(ctx context.Context, c *httpapi.Client, args []string, stdout, stderr io.Writer) error {
	const usage = "usage: tetherctl device delete NAME [--keep-names] | tetherctl device replace NAME [--ttl 24h]"
	if len(args) < 2 {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("device "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	keep := fs.Bool("keep-names", false, "delete: keep its hostnames and ports taken (free them later with lease release)")
	ttl := fs.Duration("ttl", 24*time.Hour, "replace: how long the replacement token is valid")
	name, rest := args[1], args[2:]
	if err := fs.Parse(rest); err != nil {
		return err
	}
	switch args[0] {
	case "delete":
		res, err := c.DeleteDevice(ctx, name, *keep)
		if err != nil {
			return err
		}
		confirmed := printRevoke(stdout, res.RevokeResult)
		what := "its names are in quarantine"
		if *keep {
			what = "its names stay taken until tetherctl lease release"
		}
		fmt.Fprintf(stdout, "deleted %s: %d lease(s); %s\n", res.Device.Name, len(res.Leases), what)
		if !confirmed {
			return statusUnconfirmed
		}
		return nil
	case "replace":
		res, err := c.ReplaceDevice(ctx, name, *ttl)
		if err != nil {
			return err
		}
		confirmed := printRevoke(stderr, res.RevokeResult)
		fmt.Fprintln(stdout, res.Secret)
		fmt.Fprintf(stderr, "token %s: enrolls one new device as %s, with its leases; expires %s; shown once\n",
			res.Token.ID, res.Device.Name, res.Token.ExpiresAt.Local().Format(time.RFC3339))
		if !confirmed {
			return statusUnconfirmed
		}
		return nil
	}
	return errors.New(usage)
}
