# shellcheck shell=bash
# Install Debian's Chromium for the report test (headless screenshot). Sourced by .ci/run; idempotent.
# On failure it prints one line and returns 1; the test then skips with a visible reason.
_dsft_ci_chromium() {
    if command -v chromium >/dev/null 2>&1; then return 0; fi
    export DEBIAN_FRONTEND=noninteractive
    if { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
         || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; then
        echo "chromium.sh: $(chromium --version 2>/dev/null)"
        return 0
    fi
    echo "chromium.sh: apt-get install chromium failed; the report screenshot test will be skipped" >&2
    return 1
}
_dsft_ci_chromium
