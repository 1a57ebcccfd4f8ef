#!/bin/sh
# prerm of the tether-agent package: stops and disables the agent (dpkg
# passes "upgrade" on an upgrade: the agent keeps running until postinst
# restarts it).
set -e
case ${1:-remove} in
upgrade | 1) exit 0 ;; # deb upgrade; rpm passes the count of versions left
esac
if [ -n "${DPKG_ROOT:-}" ]; then
	systemctl --root="$DPKG_ROOT" disable tether-agent.service >/dev/null 2>&1 || true
elif [ -d /run/systemd/system ]; then
	systemctl disable --now tether-agent.service >/dev/null 2>&1 || true
fi
exit 0
