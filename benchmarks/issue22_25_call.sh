# The second device call of a session (~8 min; H100 or H200): issue 25's first step (does torch's own AOTInductor
# CUDA package load on this machine?) and issue 22's int4 lab (today's int4 configs and the pair-decode tiles against
# bf16 cuBLAS and tinygemm on the 8B layer's four linears). Run with the device tool, carry [".whl", ".cache"]:
#     bash benchmarks/issue22_25_call.sh
# Writes stages.txt, aoti.txt, int4_lab.txt, int4_lab.json, tuning.tgz under $OUT (<= 8 files).
source benchmarks/h200_session.sh
record_versions
stage 190 aoti python benchmarks/experiments/aoti_control.py --timeout 120 --cases linear \
    --steps metadata,aoti_load_package,runner_so
stage 300 int4_lab python benchmarks/experiments/int4_mma_lab.py --out "$OUT/int4_lab.json"
save_tuning
