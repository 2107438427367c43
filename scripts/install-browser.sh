#!/usr/bin/env bash
# Install what the browser test tier needs: Debian's Chromium, its WebDriver
# (chromium-driver, /usr/bin/chromedriver) and a font (fonts-dejavu-core: without one the
# screenshots the tests keep show boxes instead of text). Idempotent: a second run says "cached".
#
#   bash scripts/install-browser.sh
#
# Selenium itself is a test extra of the project (pip install -e '.[test]'). Selenium's own
# driver download cannot reach the internet here: the tests give /usr/bin/chromedriver.
# Needs root for apt-get. Debian 12 (bookworm).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

T_START="$(_now)"
step_begin browser-packages
missing=()
for pkg in chromium chromium-driver fonts-dejavu-core; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    step_cached "chromium $(dpkg-query -W -f='${Version}' chromium), chromium-driver and a font installed"
else
    [[ "$(id -u)" == 0 ]] || die "installing ${missing[*]} needs root (run this script as root)"
    export DEBIAN_FRONTEND=noninteractive
    run_logged apt-update apt-get update -q || die "apt-get update failed (see above)"
    run_logged apt-install-browser apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed (see above)"
    step_done "installed ${missing[*]}"
fi
[[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] \
    || die "chromium or chromedriver missing from /usr/bin after installing"
say "==> install-browser: ok ($(/usr/bin/chromium --version 2>/dev/null | head -1))  [$(_elapsed "$T_START")]"
