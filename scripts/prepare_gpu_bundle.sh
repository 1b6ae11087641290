#!/usr/bin/env bash
# Prepare .gpu/ for scripts/gpu_checks.sh on a GPU machine that has PyTorch but no internet and not this
# project's other packages: .gpu/site/ gets the pure-Python packages the checks import (omegaconf, opacus, and
# learn2learn 0.2.0's MAML source files, unchanged, under a package __init__ that skips its compiled data
# modules), and .gpu/data/omniglot/ the two official Omniglot zips. About 16 MB. .gpu/ is ignored by git.
#
#   bash scripts/prepare_gpu_bundle.sh [DATA_ROOT]     # DATA_ROOT default: $META_DATA_ROOT or ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT="${1:-${META_DATA_ROOT:-../shared/data}}"
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

rm -rf .gpu && mkdir -p .gpu/site/learn2learn/algorithms .gpu/site/learn2learn/utils .gpu/data/omniglot
cp -r "$SITE/omegaconf" "$SITE/opacus" .gpu/site/
L2L="$SITE/learn2learn"
cp "$L2L/_version.py" .gpu/site/learn2learn/
cp "$L2L/algorithms/maml.py" "$L2L/algorithms/base_learner.py" .gpu/site/learn2learn/algorithms/
cp "$L2L/utils/__init__.py" .gpu/site/learn2learn/utils/
cat > .gpu/site/learn2learn/__init__.py <<'EOF'
# learn2learn 0.2.0's MAML, unmodified source files (algorithms/maml.py, algorithms/base_learner.py,
# utils/__init__.py); only this package __init__ is trimmed so that the compiled data modules, gym and
# the vision/text datasets (which need a Cython build for this Python) are not imported.
from ._version import __version__
from . import algorithms
from .utils import *
EOF
echo 'from .maml import MAML, maml_update' > .gpu/site/learn2learn/algorithms/__init__.py
cp "$DATA_ROOT"/omniglot/images_background.zip "$DATA_ROOT"/omniglot/images_evaluation.zip .gpu/data/omniglot/
find .gpu -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
