# One device call for issues 21 and 22 (~5 min on a cold H100/H200), carry [".whl"]:
#     rm -rf .whl/old && mkdir -p .whl/old && git archive dd29c86 qcompile benchmarks/experiments/int4_mma_lab.py | tar -x -C .whl/old
#     bash benchmarks/issue21_22_call.sh
# 1. generate()'s host floor per decode step (benchmarks/experiments/generate_host_floor.py: a tiny Llama compiled
#    as compile_blocks does it, one replay a step): transformers' masks and per-step stop check, decode_masks, and
#    decode_masks + deferred_stop, tokens compared (issue 21's b1 gap is this host time);
# 2. the int4 lab (benchmarks/experiments/int4_mma_lab.py) on the kernels of .whl/old (dd29c86: before the word
#    GEMV's per-position magic, c790c2a) and on this checkout's, same GPU: "today" (the shipped choices) old vs new;
# 3. the GPU tests of the word GEMVs (real shapes) and of the per-layer transformers path (deferred_stop on CUDA).
# Writes stages.txt, floor.{json,txt}, lab_old.{json,txt}, lab_new.{json,txt}, tests.txt, tuning.tgz under $OUT.
source benchmarks/h200_session.sh
record_versions
stage 100 floor python benchmarks/experiments/generate_host_floor.py --steps 128 --out "$OUT/floor.json"
[ -d .whl/old ] && stage 110 lab_old env PYTHONPATH=/tmp/site python .whl/old/benchmarks/experiments/int4_mma_lab.py --budget-s 90 --out "$OUT/lab_old.json"
stage 160 lab_new python benchmarks/experiments/int4_mma_lab.py --budget-s 100 --out "$OUT/lab_new.json"
stage 90 tests python -m pytest -m gpu tests/kernels/triton/test_linear.py -k "ptx_gemvs or few_row" tests/test_per_layer.py -p no:cacheprovider -q -o addopts="" -x
save_tuning
