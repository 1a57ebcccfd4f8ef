// Command xbuild is `make cross`: it builds every target of the cross
// table into a directory with SHA256SUMS, prints each binary's size next to
// its budget, and exits 1 when a budget is exceeded.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"text/tabwriter"

	"github.com/tetherfleet/tether/cross"
)

func main() {
	out := flag.String("out", "dist", "output directory")
	version := flag.String("version", "dev", "version stamped into the binaries")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	results, err := cross.Build(ctx, cross.Options{OutDir: *out, Version: *version})
	if len(results) > 0 {
		tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "binary\tsize MiB\tbudget MiB\tof budget\tboard\t")
		for _, r := range results {
			mark := ""
			if r.OverBudget() {
				mark = "  OVER"
			}
			fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%.0f%%%s\t%s\t\n", r.Filename(), float64(r.Size)/cross.MiB,
				float64(r.Budget)/cross.MiB, 100*float64(r.Size)/float64(r.Budget), mark, r.Board)
		}
		tw.Flush()
		fmt.Printf("checksums in %s/SHA256SUMS\n", *out)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "make cross:", err)
		os.Exit(1)
	}
}
