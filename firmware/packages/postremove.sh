#!/bin/sh
# postrm of the tether-agent package: on purge, removes the device's
# identity (/var/lib/tether-agent) and the agent's update leftovers; a
# plain remove keeps the identity, as install.sh --uninstall does.
set -e
root=${DPKG_ROOT:-}
if [ "${1:-}" = purge ]; then
	rm -rf "$root/var/lib/tether-agent"
fi
if [ "${1:-}" = remove ] || [ "${1:-}" = purge ] || [ "${1:-}" = 0 ]; then
	rm -f "$root/opt/tether-agent/tether-agent.prev" "$root/opt/tether-agent/tether-agent.new"
	rmdir "$root/opt/tether-agent" 2>/dev/null || true
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
