// Package firmware holds what ships to a device besides the agent binary:
// the hardened systemd unit, the default agent env file and the one-line
// install script that relays serve at /install.sh.
//
// The files are embedded as written in this directory (tether-agent.service,
// agent.env, install.sh), so the packages, the script and the tests use the
// same bytes. Signed release manifests are package firmware/release.
package firmware

import (
	"bytes"
	_ "embed"
	"strings"
)

//go:embed tether-agent.service
var unit []byte

//go:embed agent.env
var agentEnv []byte

//go:embed install.sh
var installScript []byte

// Where the unit, the script and the packages put things on a device.
const (
	BinaryPath = "/opt/tether-agent/tether-agent"
	// ProvisionPath is a root-owned copy of the agent that the unit runs
	// as root for SD-card provisioning: never the updatable BinaryPath,
	// which the agent's user owns (root must not run what it may rewrite).
	// Updates over the air do not change it; install.sh and the packages do.
	ProvisionPath = "/usr/lib/tether-agent/tether-agent"
	EnvFilePath   = "/etc/tether/agent.env"
	StateDir      = "/var/lib/tether-agent"
	TokenFilePath = "/var/lib/tether-agent/enroll-token"
	UnitName      = "tether-agent.service"
	User          = "tether"
)

// Unit returns the systemd unit tether-agent.service.
func Unit() []byte { return bytes.Clone(unit) }

// AgentEnv returns the default /etc/tether/agent.env of a package: every
// setting commented out, for the operator or a boot-partition tether.env
// to fill in.
func AgentEnv() []byte { return bytes.Clone(agentEnv) }

// InstallScript returns install.sh with relayURL (https://HOST[:PORT], the
// relay serving it) and the release public keys (minisign "RW..." strings)
// filled in as its defaults, and the systemd unit embedded. The values are
// shell-quoted; the script itself refuses values with quotes or newlines.
func InstallScript(relayURL string, releaseKeys []string) []byte {
	s := string(installScript)
	s = strings.Replace(s, "default_relay='' # @relay@", "default_relay="+shellQuote(relayURL), 1)
	s = strings.Replace(s, "default_keys='' # @release-keys@", "default_keys="+shellQuote(strings.Join(releaseKeys, ",")), 1)
	s = strings.Replace(s, "# @unit@\n", string(unit), 1)
	return []byte(s)
}

// shellQuote quotes s for POSIX sh: in single quotes, each ' as '\”.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
