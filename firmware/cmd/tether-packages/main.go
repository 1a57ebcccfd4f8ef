// Command tether-packages builds the agent's .deb and .apk for every agent
// architecture of the cross matrix from the binaries make cross put in
// ./dist (make packages).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"

	"github.com/tetherfleet/tether/cross"
	"github.com/tetherfleet/tether/firmware/packages"
)

var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tether-packages:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("tether-packages", flag.ContinueOnError)
	dist := fs.String("dist", "dist", "directory with the agent binaries (make cross)")
	out := fs.String("out", "dist/packages", "directory for the packages")
	ver := fs.String("version", version, "release version (v1.4.0 or git describe)")
	formats := fs.String("formats", strings.Join(packages.Formats, ","), "package formats, comma-separated")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var arches []string
	for _, t := range cross.Targets {
		if t.Binary == "tether-agent" {
			arches = append(arches, t.Arch())
		}
	}
	paths, err := packages.Build(ctx, packages.Options{DistDir: *dist, OutDir: *out, Arches: arches,
		Formats: strings.Split(*formats, ","), Version: *ver})
	for _, p := range paths {
		fmt.Println(p)
	}
	return err
}
