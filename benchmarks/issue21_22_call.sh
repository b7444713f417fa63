# One device call for issues 21 and 22 (~6 min on a cold H100/H200), carry [".whl"]:
#     bash benchmarks/issue21_22_call.sh
# 1. generate()'s host floor per decode step with transformers' masks and with qcompile.decode_masks' one-op mask,
#    tokens compared (benchmarks/experiments/generate_host_floor.py: validates decode_masks on the device's
#    transformers; issue 21's b1 gap is this host time);
# 2. the int4 lab at M = 1, 16, 128 (benchmarks/experiments/int4_mma_lab.py): every pair-decode tile in place and as
#    block_product (ptxas serialized the in-place tiles' wgmma), against bf16 cuBLAS and tinygemm (issue 22);
# 3. the GPU tests of the Triton template (real shapes, block_product included).
# Writes stages.txt, floor.json, floor.txt, int4_lab.json, int4_lab.txt, tests.txt, tuning.tgz under $OUT; here
# afterwards: tuning.tgz through benchmarks/h200_seed.py, int4_lab.json to benchmarks/experiments/ if it is news.
source benchmarks/h200_session.sh
record_versions
stage 90 floor python benchmarks/experiments/generate_host_floor.py --steps 128 --out "$OUT/floor.json"
stage 240 int4_lab python benchmarks/experiments/int4_mma_lab.py --out "$OUT/int4_lab.json"
stage 120 tests python -m pytest -m gpu tests/kernels/triton/test_linear.py -k "pair" -p no:cacheprovider -q -o addopts="" -x
save_tuning
