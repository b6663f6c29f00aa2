#!/usr/bin/env bash
# Install everything a fresh Debian 12 (bookworm) machine needs to run Burrow,
# its tests, the demo and the benchmarks.
#
#   * apt: Java runtime + ZooKeeper 3.8, etcd 3.4 (server + etcdctl), curl, zstd, jq,
#     PostgreSQL 15 (the database of the Prefect server the orchestrator tests and a fleet use;
#     the tests start it as a plain process from /usr/lib/postgresql/<version>/bin, never through
#     the service manager, so the cluster the package may set up and start is not used)
#   * Consul 1.8.7: not packaged in bookworm, so the .deb is fetched from
#     bullseye with a *private* apt configuration under .tools/apt/ (nothing in
#     /etc/apt is touched) and unpacked into .tools/consul-root/
#   * uv (from PyPI if not already on PATH), then `uv sync --frozen` and the bytecode
#
# Needs root and network access to the Debian mirror and PyPI only.
# Idempotent: re-running skips every step that is already done.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${REPO_ROOT}/.tools"
CONSUL_ROOT="${TOOLS_DIR}/consul-root"
CONSUL_BIN="${CONSUL_ROOT}/usr/bin/consul"

export DEBIAN_FRONTEND=noninteractive

log() { echo "install-deps: $*"; }
die() { echo "install-deps: ERROR: $*" >&2; exit 1; }

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root"
fi

# ---------------------------------------------------------------- apt packages
APT_PACKAGES=(
    default-jre-headless
    zookeeper
    etcd-server
    etcd-client
    curl
    zstd
    jq
    ca-certificates
    python3
    python3-pip
    postgresql
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt: all packages already installed"
fi

# Sanity: the binaries the test-suite relies on.
for bin in java etcd etcdctl curl zstd jq; do
    command -v "$bin" >/dev/null || die "'$bin' not on PATH after apt install"
done
[[ -f /usr/share/java/zookeeper.jar ]] || die "/usr/share/java/zookeeper.jar missing after apt install"
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null ||
    die "no /usr/lib/postgresql/<version>/bin/postgres after apt install"
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null ||
    die "no /usr/lib/postgresql/<version>/bin/initdb after apt install"

# A headless Chromium for scripts/screenshots.py (the README's UI screenshots). Only that script
# needs it, so a failure here is a warning, not an error.
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
    log "apt: installing chromium-headless-shell (for scripts/screenshots.py)"
    apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null 2>&1 ||
        log "warning: chromium-headless-shell did not install; scripts/screenshots.py will say so"
fi

# ------------------------------------------------------ consul from bullseye
# Pick the Debian mirror host this machine already uses (deb822 or one-line
# format), falling back to deb.debian.org.
debian_mirror() {
    local files=() f uri
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] && files+=("$f")
    done
    if ((${#files[@]})); then
        uri="$(
            grep -hv '^[[:space:]]*#' "${files[@]}" 2>/dev/null |
                grep -oE '(https?)://[^[:space:]]+/debian/?([[:space:]]|$)' |
                head -n1 | tr -d '[:space:]' || true
        )"
        if [[ -n "$uri" ]]; then
            echo "${uri%/}"
            return
        fi
    fi
    echo "http://deb.debian.org/debian"
}

if [[ -x "$CONSUL_BIN" ]]; then
    log "consul: already present ($("$CONSUL_BIN" version | head -n1))"
else
    APT_DIR="${TOOLS_DIR}/apt"
    mkdir -p "${APT_DIR}/lists/partial" "${APT_DIR}/cache/archives/partial" "${APT_DIR}/debs"
    MIRROR="$(debian_mirror)"
    KEYRING=/usr/share/keyrings/debian-archive-bullseye-stable.gpg
    [[ -f "$KEYRING" ]] || KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    echo "deb [signed-by=${KEYRING}] ${MIRROR} bullseye main" >"${APT_DIR}/sources.list"

    APT_OPTS=(
        -o "Dir::Etc::sourcelist=${APT_DIR}/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=${APT_DIR}/lists"
        -o "Dir::Cache=${APT_DIR}/cache"
        -o "Dir::Cache::archives=${APT_DIR}/cache/archives"
        -o "APT::Get::List-Cleanup=0"
        -o "Acquire::Check-Valid-Until=false"
        -o "Acquire::Languages=none"
        -o "APT::Sandbox::User=root"
    )
    log "consul: fetching bullseye package index from ${MIRROR}"
    apt-get "${APT_OPTS[@]}" update -qq >/dev/null
    log "consul: downloading consul .deb"
    (cd "${APT_DIR}/debs" && rm -f consul_*.deb && apt-get "${APT_OPTS[@]}" download -qq consul >/dev/null)
    deb="$(ls -1 "${APT_DIR}"/debs/consul_*.deb | head -n1)"
    [[ -n "$deb" ]] || die "consul .deb not downloaded"
    rm -rf "${CONSUL_ROOT}.tmp"
    dpkg -x "$deb" "${CONSUL_ROOT}.tmp"
    [[ -x "${CONSUL_ROOT}.tmp/usr/bin/consul" ]] || die "no usr/bin/consul inside $deb"
    rm -rf "$CONSUL_ROOT"
    mv "${CONSUL_ROOT}.tmp" "$CONSUL_ROOT"
    log "consul: installed $("$CONSUL_BIN" version | head -n1) at ${CONSUL_BIN}"
fi

# -------------------------------------------------------------------- uv
if ! command -v uv >/dev/null 2>&1; then
    log "uv: installing from PyPI"
    # Debian 12's python is "externally managed" (PEP 668); uv is a standalone
    # binary, so installing it system-wide with pip is harmless.
    python3 -m pip install --quiet --root-user-action=ignore --break-system-packages uv ||
        python3 -m pip install --quiet --root-user-action=ignore uv
    hash -r
    if ! command -v uv >/dev/null 2>&1; then
        for d in /usr/local/bin "${HOME:-/root}/.local/bin"; do
            if [[ -x "$d/uv" ]]; then
                export PATH="$d:$PATH"
                break
            fi
        done
    fi
    command -v uv >/dev/null 2>&1 || die "uv not on PATH after pip install"
else
    log "uv: already on PATH ($(uv --version))"
fi

# ------------------------------------------------------------- python deps
log "uv: syncing project environment"
(cd "$REPO_ROOT" && uv sync --frozen --quiet)
[[ -x "${REPO_ROOT}/.venv/bin/python" ]] || die ".venv/bin/python missing after uv sync"

# Bytecode, as pip writes it on install (uv does not by default): without it every command
# compiles Prefect & co. from source, and where PYTHONDONTWRITEBYTECODE is set (this CI's
# machines) it does so on every run, doubling `import prefect`. Once per uv.lock (about 15 s).
BYTECODE_STAMP="${REPO_ROOT}/.venv/.burrow-bytecode"
LOCK_SUM="$(sha256sum "${REPO_ROOT}/uv.lock" | cut -d' ' -f1)"
if [[ "$(cat "$BYTECODE_STAMP" 2>/dev/null || true)" != "$LOCK_SUM" ]]; then
    log "uv: compiling the environment's bytecode"
    (cd "$REPO_ROOT" && uv sync --frozen --quiet --compile-bytecode)
    echo "$LOCK_SUM" > "$BYTECODE_STAMP"
fi
# Burrow's own modules too (a changed source is recompiled on import, so this never goes stale
# silently).
"${REPO_ROOT}/.venv/bin/python" -m compileall -q -j 0 "${REPO_ROOT}/burrow" "${REPO_ROOT}/blocks" \
    "${REPO_ROOT}/tasks" "${REPO_ROOT}/flows" >/dev/null

echo "install-deps: ok"
