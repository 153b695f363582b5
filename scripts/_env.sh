# Shared by quickstart.sh and test.sh: create .venv and install what is missing.
# torch comes first, pinned (this machine's pip finds its CPU wheel locally), so the bare `torch`
# requirement of pyproject.toml is already met and never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # pip's warnings about this machine's package indexes are noise on success: shown only on failure.
  if ! pip install -q torch==2.13.0 >.venv/install-torch.log 2>&1; then
    cat .venv/install-torch.log >&2
    exit 1
  fi
fi
stamp=.venv/.grpo_cli-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # pip's build warnings are noise on success; show them only if the install fails.
  if ! pip install -q -e ".[dev]" >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  touch "$stamp"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
