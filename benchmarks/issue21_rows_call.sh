# Issue 21's rows in one llama_e2e invocation (one device call, cold, ~9 min; H100 or H200), carry [".whl"]:
#     bash benchmarks/issue21_rows_call.sh
# transformers int4 generate(), our own model's int4 row and transformers bf16 under its own reduce-overhead recipe
# first (the ratios the issue asks for), then torchao's int4 (tinygemm) row on the same transformers model, the
# float8_dynamic and int8_dynamic transformers rows, and last torchao's float8 row (its first call took 94 s on the
# H100, session 18), decode b1 then b128 each; --budget-s starts no phase past it (what it cuts is the end of the
# list). Session 18's cold first calls on the H100 add up to ~510 s, so the command runs close to its 600 s:
# TESTS=1 adds the GPU tests of the per-layer path (30 s). Writes stages.txt, e2e.json, e2e.txt, tuning.tgz under $OUT;
# here afterwards: the new rows of <files_at>/e2e.json into benchmarks/llama_e2e_results_h100.json (H100) or
# llama_e2e_results.json (H200), tuning.tgz through benchmarks/h200_seed.py.
source benchmarks/h200_session.sh
record_versions
e2e_results
# ROWS, BUDGET (llama_e2e's --budget-s), E2E_LIMIT (the stage's) and TESTS=0 shrink the call where device time is short
stage ${E2E_LIMIT:-560} e2e python benchmarks/llama_e2e.py \
    --rows ${ROWS:-transformers,int4_weight_only,transformers_bf16_reduce_overhead,transformers_torchao_int4,transformers_float8_dynamic,transformers_int8_dynamic,transformers_torchao_float8} \
    --phases decode_b1,decode_b128 --compile-scope layer --budget-s ${BUDGET:-470} --out "$OUT/e2e.json"
[ "${TESTS:-0}" = 0 ] || stage 30 tests python -m pytest -m gpu tests/test_step_graphs.py tests/test_per_layer.py -p no:cacheprovider -q -o addopts="" -x
save_tuning
