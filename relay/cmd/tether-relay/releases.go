package main

import (
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/firmware/release"
	"github.com/tetherfleet/tether/relay/releasecache"
)

// releaseKeys parses TETHER_RELEASE_KEYS.
func releaseKeys(s string) (release.Keys, error) {
	keys, err := release.ParseKeys(strings.Split(s, ","))
	if err != nil {
		return nil, err
	}
	return keys, nil
}

// releases is the relay's release cache (<data dir>/release-cache) over
// the control plane's releases; nil without release keys: agents are then
// never offered updates and /install.sh is not served.
func releases(keys release.Keys, cp *natsapi.Client, dataDir string, log *slog.Logger) (controlplane.Releases, error) {
	if len(keys) == 0 {
		log.Info("no TETHER_RELEASE_KEYS: agents are not updated and /install.sh is not served")
		return nil, nil
	}
	c, err := releasecache.New(releasecache.Config{Upstream: cp, Dir: filepath.Join(dataDir, "release-cache"), Keys: keys, Logger: log})
	if err != nil {
		return nil, err
	}
	return c, nil
}
