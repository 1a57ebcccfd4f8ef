#!/bin/sh
# install.sh: installs the Tether agent on a Linux device, from the relay
# that serves this script (POSIX sh: dash, busybox ash).
#
#   curl -fsSL https://RELAY/install.sh | sudo sh -s -- --token tth_... --services web=http://127.0.0.1:8080
#   TETHER_ENROLL_TOKEN=tth_... TETHER_SERVICES=ssh=tcp://127.0.0.1:22 sh install.sh
#   sh install.sh --uninstall [--purge]
#
# It picks the agent for this CPU (armv6 armv7 arm64 amd64 riscv64 mipsle),
# downloads the signed release manifest, its signature and the binary from
# the relay, verifies the signature with the release key(s) built into this
# script (minisign, else OpenSSL 3; neither: it refuses) and the binary's
# SHA-256 against the manifest, creates the system user "tether", installs
# /opt/tether-agent/tether-agent, /etc/tether/agent.env (0600), the token
# file /var/lib/tether-agent/enroll-token (0600) and the hardened systemd
# unit, starts the agent and prints the device's URLs once it is connected.
# Running it again upgrades in place and keeps the device's identity
# (/var/lib/tether-agent); settings not given again are kept.
#
# Options: sh install.sh --help.
set -eu

# Filled in by the relay when it serves this script.
default_relay='' # @relay@
default_keys='' # @release-keys@

die() {
	echo "tether install: $*" >&2
	exit 1
}
say() { echo "tether install: $*"; }

usage() {
	cat <<'TETHER_USAGE_EOF'
Installs the Tether agent from the relay that serves this script.
  curl -fsSL https://RELAY/install.sh | sudo sh -s -- --token tth_... --services web=http://127.0.0.1:8080

Options (environment variable in brackets):
  --token TOKEN        enrollment token, needed on the first install [TETHER_ENROLL_TOKEN]
  --services LIST      NAME=http://HOST:PORT,NAME=tcp://HOST:PORT [TETHER_SERVICES]
  --name NAME          requested device name; default: the hostname [TETHER_DEVICE_NAME]
  --relay URL          the relay (https:// or wss://); default: the relay that served this script
  --release-keys KEYS  minisign public keys (RW...), comma-separated; default: the relay's
  --relay-ca FILE      PEM CA of a self-hosted relay (copied to /etc/tether/relay-ca.pem)
  --wait SECONDS       how long to wait for the device's URLs (default 60; 0: do not wait)
  --uninstall          stop and remove the agent; keeps the identity in /var/lib/tether-agent
  --purge              with --uninstall: remove the identity too
  -h, --help           this text

Run again to upgrade in place (identity and settings kept; never to an older
release than the installed agent's).
TETHER_INSTALL_ROOT=DIR installs under DIR and changes nothing on the host: the
user goes into DIR/etc/passwd (group, shadow, gshadow), the unit is enabled with
systemctl --root, nothing starts; without --token and --services each card's
tether.env provides them. For tests and image builders.
TETHER_INSTALL_ARCH=ARCH overrides the detected architecture
(armv6 armv7 arm64 amd64 riscv64 mipsle).
TETHER_USAGE_EOF
}

token=${TETHER_ENROLL_TOKEN:-}
services=${TETHER_SERVICES:-}
name=${TETHER_DEVICE_NAME:-}
relay=
keys=
relay_ca=
wait_secs=60
action=install
purge=0
root=${TETHER_INSTALL_ROOT:-}

while [ $# -gt 0 ]; do
	opt=$1
	case $opt in
	--uninstall) action=uninstall ;;
	--purge) purge=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	--token | --services | --name | --relay | --release-keys | --relay-ca | --wait)
		[ $# -ge 2 ] || die "$opt needs a value"
		case $opt in
		--token) token=$2 ;;
		--services) services=$2 ;;
		--name) name=$2 ;;
		--relay) relay=$2 ;;
		--release-keys) keys=$2 ;;
		--relay-ca) relay_ca=$2 ;;
		--wait) wait_secs=$2 ;;
		esac
		shift
		;;
	--*=*) die "write '${opt%%=*} VALUE', not '$opt'" ;;
	*) die "unknown argument '$opt' (see --help)" ;;
	esac
	shift
done

case $wait_secs in
'' | *[!0-9]*) die "--wait wants a number of seconds, not '$wait_secs'" ;;
esac

bin_dir=$root/opt/tether-agent
bin=$bin_dir/tether-agent
# A root-owned copy the unit runs as root to take a boot-partition
# tether.env: root never runs the binary the agent's user may rewrite.
provision_bin=$root/usr/lib/tether-agent/tether-agent
etc_dir=$root/etc/tether
env_file=$etc_dir/agent.env
ca_file=$etc_dir/relay-ca.pem
state_dir=$root/var/lib/tether-agent
token_file=$state_dir/enroll-token
unit_file=$root/etc/systemd/system/tether-agent.service
user=tether

# On the device (the paths the agent sees, without the install root).
dev_state_dir=/var/lib/tether-agent
dev_token_file=$dev_state_dir/enroll-token
dev_ca_file=/etc/tether/relay-ca.pem

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
	die "run me as root (curl ... | sudo sh -s -- ...)"
fi

have() { command -v "$1" >/dev/null 2>&1; }

use_systemd() { [ -z "$root" ] && have systemctl && [ -d /run/systemd/system ]; }

# env_value KEY: the value of KEY in the existing env file ('' if none).
env_value() {
	[ -f "$env_file" ] || return 0
	sed -n "s/^$1=//p" "$env_file" | tail -n 1
}

# --- uninstall --------------------------------------------------------------

remove_user() {
	if [ -n "$root" ]; then
		for f in "$root/etc/passwd" "$root/etc/group" "$root/etc/shadow" "$root/etc/gshadow"; do
			if [ -f "$f" ] && grep -q "^$user:" "$f"; then
				grep -v "^$user:" "$f" >"$f.tether-tmp" || true
				cat "$f.tether-tmp" >"$f"
				rm -f "$f.tether-tmp"
			fi
		done
	elif id "$user" >/dev/null 2>&1; then
		if have userdel; then
			userdel "$user" || true
		elif have deluser; then
			deluser "$user" || true
		fi
	fi
}

uninstall() {
	if use_systemd; then
		systemctl disable --now tether-agent.service >/dev/null 2>&1 || true
	fi
	if [ -n "$root" ] && have systemctl; then
		systemctl --root="$root" disable tether-agent.service >/dev/null 2>&1 || true
	fi
	rm -f "$unit_file" "$root/etc/systemd/system/multi-user.target.wants/tether-agent.service"
	if use_systemd; then
		systemctl daemon-reload || true
	fi
	rm -rf "$bin_dir"
	rm -f "$env_file" "$ca_file" "$token_file"
	rmdir "$etc_dir" 2>/dev/null || true
	if [ "$purge" = 1 ]; then
		rm -rf "$state_dir"
		say "removed the agent and its identity"
	else
		say "removed the agent; its identity stays in $dev_state_dir (--purge removes it)"
	fi
	remove_user
}

if [ "$action" = uninstall ]; then
	uninstall
	exit 0
fi

# --- settings ---------------------------------------------------------------

[ -n "$relay" ] || relay=$default_relay
[ -n "$relay" ] || relay=$(env_value TETHER_RELAY_URL | sed 's/,.*//')
[ -n "$relay" ] || die "no relay: pass --relay https://relay.example.com (or fetch this script from your relay's /install.sh)"
[ -n "$keys" ] || keys=$default_keys
[ -n "$keys" ] || keys=$(env_value TETHER_RELEASE_KEYS)
[ -n "$keys" ] || die "no release key: pass --release-keys RW... (the relay fills it in when it serves /install.sh)"
[ -n "$services" ] || services=$(env_value TETHER_SERVICES)
# An image built with TETHER_INSTALL_ROOT may leave the services and the
# token to each card's tether.env (tetherctl provision).
card_note="the device then needs a tether.env on its boot partition (tetherctl provision)"
if [ -z "$services" ]; then
	[ -n "$root" ] || die "no services: pass --services web=http://127.0.0.1:8080 (or ssh=tcp://127.0.0.1:22, comma-separated)"
	say "no --services: $card_note"
fi
[ -n "$name" ] || name=$(env_value TETHER_DEVICE_NAME)

relay=${relay%/}
case $relay in
https://*) base=$relay wss=wss://${relay#https://} ;;
wss://*) base=https://${relay#wss://} wss=$relay ;;
*) die "relay URL '$relay': want https://HOST[:PORT]" ;;
esac
hostport=${base#https://}
hostport=${hostport%%/*}
case $hostport in
*\]:*) relay_host=${hostport%:*} port_suffix=:${hostport##*:} ;;
*\]) relay_host=$hostport port_suffix= ;;
*:*) relay_host=${hostport%:*} port_suffix=:${hostport##*:} ;;
*) relay_host=$hostport port_suffix= ;;
esac
[ "$port_suffix" != ":443" ] || port_suffix=

for v in "$token" "$services" "$name" "$keys" "$relay"; do
	case $v in
	*"
"* | *[\'\"\\\$\`]*) die "settings may not hold quotes, backslashes, \$, backquotes or newlines" ;;
	esac
done

if [ -n "$relay_ca" ]; then
	[ -r "$relay_ca" ] || die "--relay-ca $relay_ca: cannot read it"
elif [ -f "$ca_file" ]; then
	relay_ca=$ca_file
fi

enrolled=0
[ -f "$state_dir/device.json" ] && enrolled=1
if [ -z "$token" ] && [ "$enrolled" = 0 ] && [ ! -s "$token_file" ]; then
	[ -n "$root" ] || die "this device is not enrolled: pass --token tth_... (tetherctl token create)"
	say "no --token: $card_note"
fi

# --- architecture -----------------------------------------------------------

# elf_byte OFFSET: one byte of this machine's own /bin/sh ELF header, in hex.
elf_byte() { od -An -tx1 -j "$1" -N 1 /bin/sh 2>/dev/null | tr -d ' \n'; }

detect_arch() {
	m=$(uname -m)
	case $m in
	x86_64 | amd64) echo amd64 ;;
	aarch64 | arm64 | armv8b | aarch64_be) echo arm64 ;;
	riscv64) echo riscv64 ;;
	armv6*) echo armv6 ;;
	armv7* | armv8l)
		# GOARM=7 needs VFPv3; an ARMv7 without it (rare) runs the armv6 build.
		if [ -r /proc/cpuinfo ] && grep -q '^Features' /proc/cpuinfo && ! grep -q '^Features.*vfpv3' /proc/cpuinfo; then
			echo armv6
		else
			echo armv7
		fi
		;;
	mips)
		# uname says "mips" for both byte orders: the ELF header's EI_DATA
		# byte of this shell tells (01 little-endian, 02 big-endian).
		if [ "$(elf_byte 5)" = 01 ]; then echo mipsle; else echo "mips (big-endian)"; fi
		;;
	mipsel | mipsle) echo mipsle ;;
	*) echo "$m" ;;
	esac
}

arch=${TETHER_INSTALL_ARCH:-$(detect_arch)}
case $arch in
armv6 | armv7 | arm64 | amd64 | riscv64 | mipsle) ;;
*) die "no Tether agent for this CPU ($arch); builds exist for armv6 armv7 arm64 amd64 riscv64 mipsle" ;;
esac

# --- download and verify ----------------------------------------------------

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tether-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

fetch() { # URL FILE
	if have curl; then
		if [ -n "$relay_ca" ]; then
			curl -fsS --proto '=https' --retry 3 --max-time 300 --cacert "$relay_ca" -o "$2" "$1"
		else
			curl -fsS --proto '=https' --retry 3 --max-time 300 -o "$2" "$1"
		fi
	elif have wget; then
		if [ -n "$relay_ca" ]; then
			wget -q -T 60 --ca-certificate="$relay_ca" -O "$2" "$1"
		else
			wget -q -T 60 -O "$2" "$1"
		fi
	else
		die "neither curl nor wget is installed"
	fi
}

release=$base/_tether/release
say "downloading the release manifest from $release"
fetch "$release/manifest.json" "$tmp/manifest.json" || die "cannot download $release/manifest.json (has a release been published?)"
fetch "$release/manifest.json.minisig" "$tmp/manifest.json.minisig" || die "cannot download $release/manifest.json.minisig"

b64d() { openssl base64 -d -A; }
hex() { od -An -tx1 -v | tr -d ' \n'; }

# verify_openssl KEY: checks the minisign signature of manifest.json with
# OpenSSL 3. minisign signs Ed25519 over the file ("Ed") or over its
# BLAKE2b-512 ("ED", prehashed), and signs the signature plus its trusted
# comment again (the global signature).
verify_openssl() {
	d=$tmp/ossl
	rm -rf "$d" && mkdir "$d"
	printf '%s' "$1" | b64d >"$d/pub" 2>/dev/null || return 1
	[ "$(wc -c <"$d/pub" | tr -d ' ')" = 42 ] || return 1
	[ "$(head -c 2 "$d/pub")" = Ed ] || return 1
	sed -n 2p "$tmp/manifest.json.minisig" | b64d >"$d/sig" 2>/dev/null || return 1
	[ "$(wc -c <"$d/sig" | tr -d ' ')" = 74 ] || return 1
	[ "$(head -c 10 "$d/pub" | tail -c 8 | hex)" = "$(head -c 10 "$d/sig" | tail -c 8 | hex)" ] || return 1
	# SubjectPublicKeyInfo for Ed25519 (RFC 8410) around the 32-byte key.
	{
		printf '\060\052\060\005\006\003\053\145\160\003\041\000'
		tail -c 32 "$d/pub"
	} >"$d/pub.der"
	tail -c 64 "$d/sig" >"$d/sig.raw"
	case $(head -c 2 "$d/sig") in
	ED) openssl dgst -blake2b512 -binary "$tmp/manifest.json" >"$d/msg" || return 1 ;;
	Ed) cp "$tmp/manifest.json" "$d/msg" ;;
	*) return 1 ;;
	esac
	openssl pkeyutl -verify -pubin -keyform DER -inkey "$d/pub.der" -rawin \
		-in "$d/msg" -sigfile "$d/sig.raw" >/dev/null 2>&1 || return 1
	# The global signature covers the signature and the trusted comment.
	trusted=$(sed -n 3p "$tmp/manifest.json.minisig")
	case $trusted in "trusted comment: "*) ;; *) return 1 ;; esac
	sed -n 4p "$tmp/manifest.json.minisig" | b64d >"$d/gsig" 2>/dev/null || return 1
	[ "$(wc -c <"$d/gsig" | tr -d ' ')" = 64 ] || return 1
	{
		cat "$d/sig.raw"
		printf '%s' "${trusted#trusted comment: }"
	} >"$d/gmsg"
	openssl pkeyutl -verify -pubin -keyform DER -inkey "$d/pub.der" -rawin \
		-in "$d/gmsg" -sigfile "$d/gsig" >/dev/null 2>&1
}

verify_manifest() {
	if have minisign && [ "${TETHER_INSTALL_VERIFIER:-}" != openssl ]; then
		verifier=minisign
	elif have openssl && openssl version 2>/dev/null | grep -q '^OpenSSL [3-9]'; then
		verifier="OpenSSL 3"
	else
		die "cannot verify the release signature: install minisign (apt install minisign) or OpenSSL 3 (apt install openssl), then run me again"
	fi
	old_ifs=$IFS
	IFS=,
	# shellcheck disable=SC2086 # split the key list on commas
	set -- $keys
	IFS=$old_ifs
	for key in "$@"; do
		key=$(echo "$key" | tr -d ' ')
		[ -n "$key" ] || continue
		if [ "$verifier" = minisign ]; then
			if minisign -Vqm "$tmp/manifest.json" -x "$tmp/manifest.json.minisig" -P "$key" >/dev/null 2>&1; then
				return 0
			fi
		elif verify_openssl "$key"; then
			return 0
		fi
	done
	die "the release manifest's signature does not verify with the release key(s) ($verifier): refusing to install"
}

verify_manifest
say "release manifest signature verified"

# manifest_get OBJECT KEY: a string or number field of one object of the
# (verified) manifest; OBJECT "" is the top level.
manifest_get() {
	# shellcheck disable=SC2020 # each of { } , becomes a newline
	tr -d ' \t\r\n' <"$tmp/manifest.json" | tr '{},' '\n\n\n' | awk -v obj="\"$1\":" -v key="\"$2\":" '
		obj == "\"\":" && index($0, key) == 1 { v = substr($0, length(key) + 1); gsub(/"/, "", v); print v; exit }
		$0 == obj { inside = 1; next }
		inside && /:$/ { exit }
		inside && index($0, key) == 1 { v = substr($0, length(key) + 1); gsub(/"/, "", v); print v; exit }'
}

version=$(manifest_get "" version)
file=$(manifest_get "$arch" file)
sum=$(manifest_get "$arch" sha256)
size=$(manifest_get "$arch" size)
case $version in '' | *[!A-Za-z0-9.+-]*) die "the manifest has no usable version" ;; esac
case $file in '' | *[!A-Za-z0-9._-]*) die "release $version has no agent for $arch" ;; esac
case $sum in *[!0-9a-f]*) die "the manifest's sha256 for $arch is not hex" ;; esac
[ "${#sum}" = 64 ] || die "the manifest's sha256 for $arch is not 64 hex digits"
case $size in '' | *[!0-9]*) die "the manifest's size for $arch is not a number" ;; esac

sha256() {
	if have sha256sum; then
		sha256sum "$1" | cut -d ' ' -f 1
	else
		openssl dgst -sha256 -r "$1" | cut -d ' ' -f 1
	fi
}

# newer A B: release version A (vX.Y.Z) is above B, by their X.Y.Z.
newer() {
	awk -v a="$1" -v b="$2" 'BEGIN {
		sub(/^v/, "", a); sub(/^v/, "", b); sub(/[-+].*/, "", a); sub(/[-+].*/, "", b)
		split(a, x, "."); split(b, y, ".")
		for (i = 1; i <= 3; i++) { if (x[i] + 0 > y[i] + 0) exit 0; if (x[i] + 0 < y[i] + 0) exit 1 }
		exit 1
	}'
}

# The installed agent's version, as it wrote it in its state dir at its
# last start (empty: none, or a dev build). Never by running the binary:
# the agent's user may have rewritten it, and this script runs as root.
installed=
if [ -f "$state_dir/version" ] && [ ! -L "$state_dir/version" ]; then
	installed=$(head -c 64 "$state_dir/version" | sed -n 's/^\(v[0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*[0-9A-Za-z.+-]*\)$/\1/p' | head -n 1)
fi

# rolled_back VERSION: the device rolled back from that release before
# (the agent's update.json): never installed again, as the agent itself
# would never take it again.
rolled_back() {
	[ -f "$state_dir/update.json" ] && [ ! -L "$state_dir/update.json" ] &&
		head -c 65536 "$state_dir/update.json" | tr -d ' \n' | grep -q "\"rolled_back\":\[[^]]*\"$1\""
}

if [ -f "$bin" ] && [ "$(sha256 "$bin")" = "$sum" ]; then
	say "tether-agent $version ($arch) is installed already"
	new_bin=
elif rolled_back "$version"; then
	say "keeping the installed tether-agent: this device rolled back from $version before (it failed here); publish a fixed release"
	new_bin=
elif [ -n "$installed" ] && newer "$installed" "$version"; then
	say "keeping the installed tether-agent $installed: the relay's release $version is older (agents never downgrade)"
	new_bin=
else
	new_bin=$tmp/agent
fi
# The root-owned provisioning copy comes from the verified download only.
if [ -n "$new_bin" ] || [ ! -f "$provision_bin" ]; then
	say "downloading tether-agent $version for $arch"
	fetch "$release/$file" "$tmp/agent" || die "cannot download $release/$file"
	[ "$(wc -c <"$tmp/agent" | tr -d ' ')" = "$size" ] || die "$file has the wrong size: refusing to install it"
	[ "$(sha256 "$tmp/agent")" = "$sum" ] || die "$file does not match the signed manifest's sha256: refusing to install it"
	say "binary sha256 matches the signed manifest"
fi

# --- user, files, unit ------------------------------------------------------

# next_id FILE: a free system id (999 downwards) in an /etc/passwd-like file.
next_id() {
	i=999
	while [ "$i" -gt 100 ] && cut -d: -f3 "$1" 2>/dev/null | grep -qx "$i"; do
		i=$((i - 1))
	done
	echo "$i"
}

ensure_user() {
	if [ -n "$root" ]; then
		mkdir -p "$root/etc"
		touch "$root/etc/passwd" "$root/etc/group"
		if ! grep -q "^$user:" "$root/etc/group"; then
			echo "$user:x:$(next_id "$root/etc/group"):" >>"$root/etc/group"
		fi
		gid=$(grep "^$user:" "$root/etc/group" | cut -d: -f3)
		if ! grep -q "^$user:" "$root/etc/passwd"; then
			echo "$user:x:$(next_id "$root/etc/passwd"):$gid:Tether agent:$dev_state_dir:/usr/sbin/nologin" >>"$root/etc/passwd"
		fi
		if [ -f "$root/etc/shadow" ] && ! grep -q "^$user:" "$root/etc/shadow"; then
			echo "$user:!::::::" >>"$root/etc/shadow"
		fi
		if [ -f "$root/etc/gshadow" ] && ! grep -q "^$user:" "$root/etc/gshadow"; then
			echo "$user:!::" >>"$root/etc/gshadow"
		fi
		uid=$(grep "^$user:" "$root/etc/passwd" | cut -d: -f3)
		owner=$uid:$gid
		[ "$(id -u)" = 0 ] || owner=
		return
	fi
	if ! id "$user" >/dev/null 2>&1; then
		nologin=/usr/sbin/nologin
		[ -x "$nologin" ] || nologin=/sbin/nologin
		[ -x "$nologin" ] || nologin=/bin/false
		if have useradd; then
			useradd --system --user-group --home-dir "$dev_state_dir" --no-create-home --shell "$nologin" "$user"
		elif have adduser; then
			addgroup -S "$user" 2>/dev/null || true
			adduser -S -D -H -h "$dev_state_dir" -s "$nologin" -G "$user" "$user"
		else
			die "cannot create the user $user: no useradd or adduser"
		fi
		say "created the system user $user"
	fi
	owner=$user:$user
}

# own FILE...: give files to the agent's user, never following a link
# (the user may have planted one pointing at a file of root's).
own() { [ -z "$owner" ] || chown -h "$owner" "$@"; }

ensure_user
# Directories others may enter (the agent reads /etc/tether/relay-ca.pem
# and runs from /opt/tether-agent), also the parents mkdir makes.
umask 022
mkdir -p "$bin_dir" "$etc_dir" "$state_dir" "$(dirname "$provision_bin")" "$(dirname "$unit_file")"
chmod 0755 "$bin_dir" "$etc_dir" "$(dirname "$provision_bin")"
umask 077
# While root writes into the agent's own directories, they are root's:
# the agent's user cannot plant a link for root to write through.
chown -h 0:0 "$bin_dir" "$state_dir" 2>/dev/null || true
chmod 0700 "$state_dir"
rm -f "$bin.new" "$token_file.new"

if [ -n "$new_bin" ]; then
	cp "$new_bin" "$bin.new"
	chmod 0755 "$bin.new"
	own "$bin.new"
	mv -f "$bin.new" "$bin"
	say "installed $bin"
fi
if [ -f "$tmp/agent" ]; then
	rm -f "$provision_bin.new"
	cp "$tmp/agent" "$provision_bin.new"
	chmod 0755 "$provision_bin.new"
	mv -f "$provision_bin.new" "$provision_bin"
fi

if [ -n "$relay_ca" ] && [ "$relay_ca" != "$ca_file" ]; then
	cp "$relay_ca" "$ca_file.new"
	chmod 0644 "$ca_file.new"
	mv -f "$ca_file.new" "$ca_file"
fi

if [ -n "$token" ]; then
	printf '%s\n' "$token" >"$token_file.new"
	chmod 0600 "$token_file.new"
	own "$token_file.new"
	mv -f "$token_file.new" "$token_file"
fi
# Back to the agent's user: its directories and what is in the state dir
# (links are given over as links).
own "$bin_dir" "$state_dir"
for f in "$state_dir"/* "$state_dir"/.[!.]*; do
	[ -e "$f" ] || [ -L "$f" ] || continue
	own "$f"
done

# A relay list that names this relay is kept (failover candidates).
relays=$wss
case ",$(env_value TETHER_RELAY_URL)," in
*",$wss,"*) relays=$(env_value TETHER_RELAY_URL) ;;
esac
{
	echo "# Tether agent settings, written by install.sh (tether-agent --help lists them all)."
	echo "TETHER_RELAY_URL=$relays"
	[ -z "$services" ] || echo "TETHER_SERVICES=$services"
	[ -z "$name" ] || echo "TETHER_DEVICE_NAME=$name"
	echo "TETHER_RELEASE_KEYS=$keys"
	[ ! -s "$token_file" ] || echo "TETHER_ENROLL_TOKEN_FILE=$dev_token_file"
	[ ! -f "$ca_file" ] || echo "TETHER_RELAY_CA=$dev_ca_file"
	# Every other setting of the existing file, as it was.
	if [ -f "$env_file" ]; then
		grep -v -E '^(#|[[:space:]]*$|TETHER_(RELAY_URL|SERVICES|DEVICE_NAME|RELEASE_KEYS|ENROLL_TOKEN_FILE|RELAY_CA)=)' "$env_file" || true
	fi
} >"$env_file.new"
chmod 0600 "$env_file.new"
mv -f "$env_file.new" "$env_file"
say "wrote $env_file"

cat >"$unit_file.new" <<'TETHER_UNIT_EOF'
# @unit@
TETHER_UNIT_EOF
grep -q '^ExecStart=' "$unit_file.new" || die "this script carries no systemd unit: download it from your relay's /install.sh"
chmod 0644 "$unit_file.new"
mv -f "$unit_file.new" "$unit_file"

# --- start and show the URLs ------------------------------------------------

leases=$state_dir/leases

print_urls() {
	while read -r svc proto addr; do
		case $proto in
		http) echo "  $svc: https://$addr$port_suffix" ;;
		tcp) echo "  $svc: $relay_host:$addr (TCP)" ;;
		esac
	done <"$leases"
}

if ! use_systemd; then
	if [ -n "$root" ]; then
		# Offline: links in the root's /etc only (an image's first boot starts it).
		if have systemctl; then
			systemctl --root="$root" enable tether-agent.service >/dev/null 2>&1 || true
		fi
		say "installed under $root (TETHER_INSTALL_ROOT): enabled, not started"
	else
		say "no systemd here: run /opt/tether-agent/tether-agent as $user with the settings in /etc/tether/agent.env from your init system"
	fi
	if [ -s "$leases" ]; then
		say "the device's URLs when it last connected:"
		print_urls
	fi
	exit 0
fi

rm -f "$leases"
systemctl daemon-reload
systemctl enable tether-agent.service >/dev/null 2>&1
systemctl restart tether-agent.service
say "started tether-agent.service"
i=0
while [ "$i" -lt "$wait_secs" ]; do
	if [ -s "$leases" ]; then
		say "connected; this device's services:"
		print_urls
		exit 0
	fi
	case $(systemctl show -p ActiveState --value tether-agent.service 2>/dev/null) in
	failed | inactive)
		journalctl -u tether-agent.service -n 20 --no-pager >&2 2>/dev/null || true
		die "tether-agent stopped (journalctl -u tether-agent)"
		;;
	esac
	sleep 1
	i=$((i + 1))
done
say "not connected yet after ${wait_secs}s; follow it with: journalctl -fu tether-agent"
