#!/usr/bin/env bash
# Run HERE (the CPU machine) before scripts/gpu_check.sh: the GPU image has torch, transformers, lightning,
# timm and matplotlib but not hydra / omegaconf / miditok / symusic, and nothing can be fetched there;
# ../shared/data does not travel either.  Fills .gpu/ (ignored through .git/info/exclude):
#   .gpu/site  pure-Python packages copied from this venv;  .gpu/whl  symusic's CPython 3.12 wheel;
#   .gpu/data/jsb_chorales  the JSB chorales (108 KB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SITE=$($PY -c "import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))")
DATA=${ARMODAL_SHARED_DATA:-../shared/data}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .gpu && mkdir -p .gpu/site .gpu/whl .gpu/data
for pkg in hydra omegaconf antlr4 miditok pySmartDL platformdirs; do
    cp -r "$SITE/$pkg" .gpu/site/
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "symusic==$($PY -c 'import symusic; print(symusic.__version__)')"
cp -r "$DATA/jsb_chorales" .gpu/data/
du -sh .gpu
