package cli

import "slices"

// Known lists the settings of every Tether binary (without the TETHER_
// prefix). A variable of another binary is not warned about: operators
// share one env file between tetherctl and the daemons. Each binary's
// TestSpecNames (CheckNames) fails when one of its settings is missing
// here.
var Known = []string{
	// shared
	"DATA_DIR", "DOMAIN", "LOG_FORMAT", "LOG_LEVEL", "OPS_ADDR", "TCP_PORTS",
	"ADMIN_ADDR", "ADMIN_TOKEN", "ADMIN_TOKEN_FILE", "INSECURE",
	"RELEASE_KEYS",
	"PPROF",
	"NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_PASSWORD_FILE", "NATS_CREDS", "NATS_CA",
	// tether-relay
	"HTTP_ADDR", "HTTPS_ADDR", "TLS_CERT", "TLS_KEY", "TCP_HOST", "RELAY_ID",
	"CONNECT_RATE", "CONNECT_BURST", "ENROLL_RATE", "ENROLL_BURST",
	"CLUSTER_ADDR", "DRAIN_WINDOW", "PUBLIC_NAMES", "MAX_HANDSHAKES", "MAX_HANDSHAKES_PER_CLIENT", "HANDSHAKE_TIMEOUT", "HEARTBEAT_MIN", "HEARTBEAT_MAX", "RELEASE_RATE", "RELEASE_BURST",
	"PUBLIC_HEADER_TIMEOUT", "PUBLIC_IDLE_TIMEOUT", "PUBLIC_BODY_MIN_RATE", "PUBLIC_RESPONSE_TIMEOUT",
	"PUBLIC_STREAM_IDLE_TIMEOUT", "PUBLIC_MAX_PER_CLIENT", "PUBLIC_RESPONSE_MIN_RATE", "TCP_IDLE_TIMEOUT",
	// tether-controlplane (and the standalone relay)
	"CLAIM_WAIT", "CERT_DOMAINS", "MAX_SERVICES", "LEASE_QUARANTINE",
	// tether-agent
	"RELAY_URL", "ENROLL_TOKEN", "ENROLL_TOKEN_FILE", "STATE_DIR", "DEVICE_NAME",
	"SERVICES", "RELAY_CA", "HEARTBEAT_INTERVAL", "BOOT_DIRS",
	"UPDATE_DEADLINE", "UPDATE_RATE",
	// tetherctl
	"ADMIN_URL",
}

func known(env string) bool { return slices.Contains(Known, env[len(Prefix)+1:]) }
