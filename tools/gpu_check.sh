#!/usr/bin/env bash
# The GPU proof in one call, on a lent GPU machine (no network): run from anywhere as
#   bash tools/gpu_check.sh            (device tool: command "bash tools/gpu_check.sh", carry [".whl"])
# It installs the wheels that `make gpu-wheels` put in .whl/ (upstream optimizers, optitrainer and its
# plugins, whose entry points only installed metadata provides) into /tmp/site, then runs
# `python -m optitrainer.bench.gpu_check` (make may be missing there). Arguments are passed on
# (e.g. --only galore_adamw,galore_adamw_8bit). Writes gpu-check.md/.json to $OUT (or bench-results/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
# the check's deadline (--budget, 7.5 min) counts from here, so the install is inside the 8 minutes
GPU_CHECK_STARTED_AT=$(date +%s.%N)
GPU_CHECK_COMMAND="bash tools/gpu_check.sh${*:+ $*}"
export GPU_CHECK_STARTED_AT GPU_CHECK_COMMAND
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "tools/gpu_check.sh: no wheels in .whl/: run 'make gpu-wheels' first and carry .whl" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
# the code of this tree first (the wheels may predate an edit), then the installed wheels, whose
# metadata holds the entry points through which optitrainer finds its plugins
tree="$PWD"
for plugin in plugins/optitrainer-*/; do tree="$tree:$PWD/${plugin%/}"; done
export PYTHONPATH="$tree:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m optitrainer.bench.gpu_check "$@"
