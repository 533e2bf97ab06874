# Sourced by scripts that need Debian packages: `apt_install PKG…` installs them without
# letting their services start (nginx or Apache on port 80 of this machine).
apt_install() {
    [ $# -gt 0 ] || return 0
    local policy_made=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        policy_made=1
    fi
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends)
    "${install[@]}" "$@" || { apt-get update -qq && "${install[@]}" "$@"; }
    local status=$?
    [ -z "$policy_made" ] || rm -f /usr/sbin/policy-rc.d
    return $status
}
