#!/bin/sh
# postinst of the tether-agent package: creates the system user "tether",
# gives it the binary's directory (the agent updates itself there) and its
# state dir, and enables the unit. It starts (or restarts) the agent only
# when it can enroll or is enrolled: a package alone never starts an
# agent that has nothing to connect with. DPKG_ROOT (dpkg
# --force-script-chrootless) installs into another root: nothing on the
# host changes.
set -e
root=${DPKG_ROOT:-}
user=tether
state=/var/lib/tether-agent

if ! grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; then
	nologin=/usr/sbin/nologin
	[ -x "$root$nologin" ] || nologin=/sbin/nologin
	if command -v useradd >/dev/null 2>&1; then
		if [ -n "$root" ]; then
			useradd --prefix "$root" --system --user-group --home-dir "$state" --no-create-home --shell "$nologin" "$user"
		else
			useradd --system --user-group --home-dir "$state" --no-create-home --shell "$nologin" "$user"
		fi
	else
		addgroup -S "$user" 2>/dev/null || true
		adduser -S -D -H -h "$state" -s "$nologin" -G "$user" "$user"
	fi
fi
uid=$(grep "^$user:" "$root/etc/passwd" | cut -d: -f3)
gid=$(grep "^$user:" "$root/etc/passwd" | cut -d: -f4)

mkdir -p "$root$state"
chmod 0700 "$root$state"
chown "$uid:$gid" "$root$state" "$root/opt/tether-agent" "$root/opt/tether-agent/tether-agent"
chmod 0600 "$root/etc/tether/agent.env"

# Can the agent start? Enrolled already, or a token configured, or a
# boot-partition tether.env waiting.
ready=
[ ! -f "$root$state/device.json" ] || ready=1
if grep -Eq '^TETHER_ENROLL_TOKEN(_FILE)?=.' "$root/etc/tether/agent.env" 2>/dev/null; then ready=1; fi
for d in /boot/firmware /boot; do [ ! -f "$root$d/tether.env" ] || ready=1; done

if [ -n "$root" ]; then
	systemctl --root="$root" enable tether-agent.service >/dev/null 2>&1 || true
elif [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	systemctl enable tether-agent.service >/dev/null 2>&1 || true
	if [ -n "$ready" ]; then
		systemctl restart tether-agent.service
	else
		echo "tether-agent: not started: set TETHER_RELAY_URL, TETHER_SERVICES and TETHER_ENROLL_TOKEN_FILE in /etc/tether/agent.env (or use install.sh), then: systemctl start tether-agent"
	fi
elif command -v systemctl >/dev/null 2>&1; then
	# An image being built (pi-gen's chroot): enabled for the first boot.
	systemctl enable tether-agent.service >/dev/null 2>&1 || true
fi
exit 0
