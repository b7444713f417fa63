# Helpers for one call of the device tool on the H200: source it, then run stages, each under its own time limit,
# so that one slow stage cannot eat the others' time and every stage's output lands in $OUT.
#
#   device run, carry [".whl", ".cache"]:
#     source benchmarks/h200_session.sh
#     stage 220 tests   python -m pytest -m gpu tests/kernels/triton tests/test_cudagraphs.py -n 8 -v
#     stage 300 linear  python benchmarks/linear_h200.py --out $OUT/linear --peers .whl/peers_h200.py ...
#     save_tuning
#
# .whl (ignored) holds the test wheels (pytest, pluggy, iniconfig, pygments, expecttest, pytest-xdist, execnet) and, for the peers,
# ../shared/bench/peers_h200.py, the torchao wheel and gemlite's source under .whl/src. .cache/qcompile holds the
# tuned Triton configs (triton_linear_configs.json) and gemlite's (gemlite_configs.json): save_tuning packs them
# as $OUT/tuning.tgz; unpacked here, `python benchmarks/h200_seed.py <folder>` takes them into .cache/qcompile (the
# next call does not tune again) and the seed the package ships for the tuning GPU,
# qcompile/kernels/triton/tuned/h200.json or h100.json (gemlite's: benchmarks/h200_cache).

if [ ! -d .whl ]; then
    echo "h200_session: no .whl folder on this machine: pass carry [\".whl\", ...] to the device tool" >&2
    return 1 2>/dev/null || exit 1
fi
python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1 \
    || echo "h200_session: installing .whl/*.whl into /tmp/site failed" >&2
export PYTHONPATH=$PWD:/tmp/site:$PWD/.whl/src
export QCOMPILE_CACHE_DIR=$PWD/.cache/qcompile
# Inductor's caches (FX graphs, AOTAutograd entries, Triton binaries) in the working tree too: carry ".cache" and a
# fresh machine compiles nothing it compiled before (save_inductor_cache brings them back, within the carry limit)
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
mkdir -p "$QCOMPILE_CACHE_DIR" "$OUT"
# seed gemlite's cache with the choices committed in benchmarks/h200_cache (keyed by shape only; entries already
# here win). Ours need no seeding: the package ships them (qcompile/kernels/triton/tuned/, keyed by GPU and a hash
# of the kernels' sources) and the tuner reads them after .cache/qcompile's
python - "$QCOMPILE_CACHE_DIR" benchmarks/h200_cache/*.json <<'PY'
import json, pathlib, sys
for seed in map(pathlib.Path, sys.argv[2:]):
    here = pathlib.Path(sys.argv[1]) / seed.name
    merged = json.loads(seed.read_text())
    current = json.loads(here.read_text()) if here.exists() else {}
    nested = seed.name.startswith("gemlite")  # gemlite's file: kernel kind -> {shape key: config}
    for key, value in current.items():
        merged[key] = {**merged.get(key, {}), **value} if nested else value
    here.write_text(json.dumps(merged))
PY
SESSION_START=$(date +%s)

# stage SECONDS NAME COMMAND...: run COMMAND with a time limit; its output goes to $OUT/NAME.txt, its exit status
# and wall time to $OUT/stages.txt (124: it hit the limit).
stage() {
    local limit=$1 name=$2
    shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc wall=$(( $(date +%s) - start ))s at=$(( $(date +%s) - SESSION_START ))s: $*" >> "$OUT/stages.txt"
    return 0
}

# record_versions: the GPU, its driver and the library versions, into $OUT/stages.txt (every call's first line).
record_versions() {
    { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
      python -c "import torch, triton; import importlib.util as u; t = u.find_spec('transformers')
print(torch.__version__, triton.__version__, 'transformers', __import__('transformers').__version__ if t else None)"
    } >> "$OUT/stages.txt" 2>&1
}

# e2e_results: the llama_e2e results file of this GPU kind copied to $OUT/e2e.json (llama_e2e appends its rows to
# it; here afterwards, its new rows go back to the same file: _h100 for the H100, the other for the H200).
e2e_results() {
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
        *H100*) cp benchmarks/llama_e2e_results_h100.json "$OUT/e2e.json" ;;
        *) cp benchmarks/llama_e2e_results.json "$OUT/e2e.json" ;;
    esac
}

# save_tuning: the tuned configs as one file, $OUT/tuning.tgz (the device tool brings back few files a call: a
# ninth file was left out); here, `mkdir -p /tmp/tuning && tar -xzf <files_at>/tuning.tgz -C /tmp/tuning` and
# `python benchmarks/h200_seed.py /tmp/tuning`.
save_tuning() {
    tar -czf "$OUT/tuning.tgz" -C "$QCOMPILE_CACHE_DIR" $(cd "$QCOMPILE_CACHE_DIR" && ls *.json 2>/dev/null) 2>/dev/null || true
    cat "$OUT/stages.txt"
}

# save_inductor_cache [MAX_MB]: Inductor's cache as $OUT/inductor_cache.tgz when it compresses under MAX_MB
# (default 40: the device tool carries 64 MiB in all); if the whole cache is larger, without the compiled Triton
# binaries (the FX-graph and AOTAutograd entries alone: a warm call then skips tracing and codegen and only
# recompiles the kernels' sources). Here, `cp <files_at>/inductor_cache.tgz .whl/` (unpacked, an 8B model's cache
# is ~360 MB, over the carry limit) and unpack it there first (`bash benchmarks/issue21_call.sh warm` does).
save_inductor_cache() {
    local max_mb=${1:-40} excludes
    for excludes in "" "--exclude=inductor/triton"; do
        tar -czf /tmp/inductor_cache.tgz -C .cache $excludes inductor 2>/dev/null || return 0
        local mb=$(( $(stat -c %s /tmp/inductor_cache.tgz) / 1048576 ))
        if [ "$mb" -lt "$max_mb" ]; then
            cp /tmp/inductor_cache.tgz "$OUT/"
            echo "inductor cache saved (${mb} MB compressed${excludes:+, $excludes})" >> "$OUT/stages.txt"
            return 0
        fi
        echo "inductor cache ${mb} MB compressed${excludes:+ $excludes}: over ${max_mb} MB" >> "$OUT/stages.txt"
    done
}
