# Issue 21's device call (one call, ~9 min; H100 or H200): run with the device tool, carry [".whl", ".cache"]:
#     bash benchmarks/issue21_call.sh [warm]
# "warm" first unpacks .whl/inductor_cache.tgz (a previous call's Inductor cache) into .cache; without it every
# compile is cold, which is what the cold-compile row and the StepGraphs fix (syncs of a compiling call ignored)
# need. Writes at most 8 files under $OUT (the device tool brings back no more): stages.txt, tests.txt, e2e.json,
# e2e_t.txt, e2e_ours.txt, e2e_bf16.txt, prof.tgz (cProfile of each first call), tuning.tgz.
# Here afterwards: copy the new rows of <files_at>/e2e.json into benchmarks/ (llama_e2e_results.json for the H200,
# llama_e2e_results_h100.json for the H100), unpack tuning.tgz and run benchmarks/h200_seed.py on it.
if [ "$1" = warm ] && [ -f .whl/inductor_cache.tgz ]; then mkdir -p .cache && tar -xzf .whl/inductor_cache.tgz -C .cache; fi
source benchmarks/h200_session.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
} >> "$OUT/stages.txt" 2>&1
stage 45 tests python -m pytest -m gpu tests/test_step_graphs.py tests/test_per_layer.py -p no:cacheprovider -q \
    -o addopts="" -p no:logging
cp benchmarks/llama_e2e_results.json "$OUT/e2e.json"
stage 200 e2e_t python benchmarks/llama_e2e.py --rows transformers --phases decode_b1,decode_b128 \
    --compile-scope layer --budget-s 150 --profile-compile /tmp/prof --out "$OUT/e2e.json"
stage 130 e2e_ours python benchmarks/llama_e2e.py --rows int4_weight_only --phases decode_b1,decode_b128 \
    --budget-s 90 --out "$OUT/e2e.json"
stage 130 e2e_bf16 python benchmarks/llama_e2e.py --rows transformers_bf16_reduce_overhead \
    --phases decode_b1,decode_b128 --budget-s 90 --out "$OUT/e2e.json"
tar -czf "$OUT/prof.tgz" -C /tmp prof 2>/dev/null
save_tuning
