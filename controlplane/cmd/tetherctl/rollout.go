package main

// tetherctl rollout start|set-percent|status|pause|resume|abort.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/httpapi"
)

const rolloutUsage = `usage:
  tetherctl rollout start VERSION [--labels k=v,...] [--percent N]
  tetherctl rollout set-percent N
  tetherctl rollout status [--json]
  tetherctl rollout pause|resume|abort`

func rolloutCmd(ctx context.Context, c *httpapi.Client, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New(rolloutUsage)
	}
	switch args[0] {
	case "start":
		return rolloutStart(ctx, c, args[1:], stdout, stderr)
	case "set-percent":
		if len(args) != 2 {
			return errors.New("usage: tetherctl rollout set-percent N")
		}
		p, err := strconv.Atoi(strings.TrimSuffix(args[1], "%"))
		if err != nil {
			return fmt.Errorf("percent %q: %w", args[1], err)
		}
		r, err := c.SetRolloutPercent(ctx, p)
		if err != nil {
			return err
		}
		printRollout(stdout, r)
		return nil
	case "status":
		return list(ctx, args[1:], stdout, "rollout status", c.RolloutStatus, printRolloutStatus)
	case "pause", "resume", "abort":
		if len(args) != 1 {
			return fmt.Errorf("usage: tetherctl rollout %s", args[0])
		}
		r, err := c.RolloutAction(ctx, args[0])
		if err != nil {
			return err
		}
		printRollout(stdout, r)
		return nil
	}
	return fmt.Errorf("unknown rollout command %q\n%s", args[0], rolloutUsage)
}

// rolloutStart starts a rollout. Flags may follow VERSION. Starting the
// rollout of the current version again only changes its labels and
// percent: the devices it chose stay chosen.
func rolloutStart(ctx context.Context, c *httpapi.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rollout start", flag.ContinueOnError)
	fs.SetOutput(stderr)
	lbls := fs.String("labels", "", "k=v,... : only devices carrying every label (from their enrollment token); empty: every device")
	percent := fs.Int("percent", 100, "percent of those devices offered the release (0-100)")
	var version string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		version, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if version == "" && fs.NArg() == 1 {
		version = fs.Arg(0)
	} else if version == "" || fs.NArg() != 0 {
		return errors.New("usage: tetherctl rollout start VERSION [--labels k=v,...] [--percent N]")
	}
	selector := map[string]string{}
	if *lbls != "" {
		for kv := range strings.SplitSeq(*lbls, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return fmt.Errorf("label %q: want key=value", kv)
			}
			selector[k] = v
		}
	}
	r, err := c.StartRollout(ctx, httpapi.StartRolloutRequest{Version: version, Labels: selector, Percent: *percent})
	if err != nil {
		return err
	}
	printRollout(stdout, r)
	return nil
}

func selectorString(labels map[string]string) string {
	if len(labels) == 0 {
		return "every device"
	}
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		kv = append(kv, k+"="+labels[k])
	}
	return strings.Join(kv, ",")
}

func printRollout(w io.Writer, r controlplane.Rollout) {
	fmt.Fprintf(w, "rollout of %s: %s, %d%% of %s\n", r.Version, r.State, r.Percent, selectorString(r.Labels))
}

func printRolloutStatus(w io.Writer, st controlplane.RolloutStatus) {
	if st.Rollout == nil {
		fmt.Fprintln(w, "no rollout (tetherctl rollout start VERSION)")
		return
	}
	printRollout(w, *st.Rollout)
	fmt.Fprintf(w, "%d devices match, %d chosen\n", st.Matching, st.Chosen)
	counts := func(title string, m map[string]int) {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
		}
		fmt.Fprintf(w, "%s: %s\n", title, dash(strings.Join(parts, ", ")))
	}
	counts("versions", st.Versions)
	counts("states", st.States)
	if len(st.Devices) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tVERSION\tONLINE\tSTATE\tSINCE\tREASON")
	for _, d := range st.Devices {
		since := "-"
		if !d.At.IsZero() {
			since = d.At.Local().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", d.Name, dash(d.AgentVersion), d.Online, d.State, since, dash(d.Reason))
	}
	tw.Flush()
}
