# Issue 21's device call (one call, ~9 min; H100 or H200): run with the device tool, carry [".whl", ".cache"]:
#     bash benchmarks/issue21_call.sh [warm]
# "warm" first unpacks .whl/inductor_cache.tgz (a previous call's Inductor cache) into .cache; without it every
# compile is cold (the tuned Triton configs ship with the package, so cold means no Inductor cache only).
# The issue asks for its rows in one invocation: transformers int4 (per-layer compile, generate()), our own model's
# int4 row (per-layer compile: whole-model compile of the 8B did not finish its stage cold) and transformers bf16
# under its own reduce-overhead recipe, decode b1 then b128 (llama_e2e saves each phase as it finishes; --budget-s
# starts no phase past it). Session 12 on an H100, cold: transformers int4 first call 27.7 s, bf16 RO 53 s.
# Writes at most 8 files under $OUT (the device tool brings back no more): stages.txt, tests.txt, e2e.json,
# e2e.txt, tuning.tgz.
# Here afterwards: copy the new rows of <files_at>/e2e.json into benchmarks/ (llama_e2e_results.json for the H200,
# llama_e2e_results_h100.json for the H100), unpack tuning.tgz and run benchmarks/h200_seed.py on it.
if [ "$1" = warm ] && [ -f .whl/inductor_cache.tgz ]; then mkdir -p .cache && tar -xzf .whl/inductor_cache.tgz -C .cache; fi
source benchmarks/h200_session.sh
record_versions
e2e_results
stage 480 e2e python benchmarks/llama_e2e.py --rows transformers,int4_weight_only,transformers_bf16_reduce_overhead \
    --phases decode_b1,decode_b128 --compile-scope layer --budget-s 400 --out "$OUT/e2e.json"
stage 70 tests python -m pytest -m gpu tests/test_per_layer.py -p no:cacheprovider -q -o addopts="" -p no:logging
save_tuning
