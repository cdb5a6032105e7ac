#!/usr/bin/env bash
# One-command environment for slak_mm: a project-local venv with torch 2.14.1, mmengine 0.10.7,
# mmcv 2.1.0 (built from source with its compiled ops, wheel cached), mmdet 3.3.0, mmseg 1.2.2, timm.
# Idempotent: a second run with nothing changed is a no-op (stamp file). See docs/environment.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLAK_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
CACHE="${SLAK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/slak_mm}"
JOBS="${MAX_JOBS:-$(( $(nproc) < 2 ? 1 : 2 ))}"

log() { printf '[setup] %s\n' "$*"; }

# Everything that decides what gets installed goes into the stamp.
stamp_src() { cat "$0" "$CONSTRAINTS" "$ROOT/pyproject.toml" "$ROOT/tools/patch_mmcv.py"; "$PY" -VV; }
STAMP="$VENV/.slak_mm_setup.sha"
want="$(stamp_src | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  log "environment up to date ($VENV)"; exit 0
fi

command -v "$PY" >/dev/null || { echo "setup: $PY not found; install Python 3.11 or set PYTHON=..." >&2; exit 1; }
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || { log "creating venv $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
export PIP_CONSTRAINT="$CONSTRAINTS"   # overrides any machine-wide constraint file

log "installing torch, build tools, mmengine, timm"
"${PIP[@]}" install -q torch torchvision setuptools wheel ninja psutil
"${PIP[@]}" install -q mmengine timm numpy pycocotools

# --- mmcv 2.1.0 with compiled ops: cached wheel keyed on (CPython, torch, patch) ---------------------------
key="$("$VENV/bin/python" - <<'PY'
import sys, torch
print(f"cp{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-cxx11abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)-patch$(sha256sum "$ROOT/tools/patch_mmcv.py" | cut -c1-12)"
WHEELS="$CACHE/mmcv-wheels/$key"
if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    log "building mmcv 2.1.0 with ops (first run only: ~7-10 min on 2 cores, MAX_JOBS=$JOBS)"
    work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" mmcv==2.1.0
    "$VENV/bin/python" "$ROOT/tools/patch_mmcv.py" "$work"/mmcv-2.1.0.tar.gz "$work/patched"
    mkdir -p "$WHEELS"
    MMCV_WITH_OPS=1 MAX_JOBS="$JOBS" "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
        -w "$work/out" "$work/patched/mmcv-2.1.0.tar.gz"
    mv "$work"/out/mmcv-2.1.0-*.whl "$WHEELS"/
  fi
  log "installing cached mmcv wheel from $WHEELS"
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEELS"/mmcv-2.1.0-*.whl
fi

log "installing mmdet, mmseg and slak_mm (editable, with test/export extras)"
"${PIP[@]}" install -q mmdet mmsegmentation ftfy regex
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[dev]"

log "checking the stack"
SLAK_ROOT="$ROOT" "$VENV/bin/python" - <<'PY'
import warnings; warnings.filterwarnings('ignore')
import pkg_resources  # noqa: F401  (mmengine needs it at run time: setuptools<82)
import mmcv.ops, mmdet.models, mmseg.models, slak_mm  # noqa: F401
from mmcv.ops import nms, RoIAlign  # noqa: F401
import os
from mmengine.config import Config
root = os.environ['SLAK_ROOT']  # our configs inherit mmseg:: / mmdet:: bases (needs pkg_resources at run time)
Config.fromfile(f'{root}/configs/upernet_slak_t_ade20k.py'); Config.fromfile(f'{root}/configs/faster_rcnn_slak_t_fpn_1x_coco.py')
print('[setup] ok: mmcv', mmcv.__version__, 'with ops; mmdet/mmseg/slak_mm import')
PY
# slak_mm's C++ CPU depthwise kernel is compiled on first use (~1 min) and cached by torch; build it here, where a
# build error is visible. Without it CPU inference still runs (oneDNN, same results, slower), so only warn.
log "building slak_mm's CPU depthwise kernel (first run only, ~1 min)"
"$VENV/bin/python" -c "from slak_mm.ops.cpu_kernel import build_cpu_kernel as b; print('[setup] ok:', b().__name__)" \
  || log "WARNING: the C++ CPU kernel did not build (see above); CPU inference will use oneDNN (slower)"
echo "$want" > "$STAMP"
log "done in $(( $(date +%s) - t0 )) s"
