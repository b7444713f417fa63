# Issue 21's profile call (~5 min on a cold H100/H200; run with the device tool, carry [".whl", ".cache"]):
#     bash benchmarks/issue21_profile_call.sh
# Where transformers' int4 generate() step goes, batch 1 and 128 (wall between graph launches, GPU busy, top
# kernels: benchmarks/experiments/hf_step_profile.py), once with the grouped-query attention op as the fused SDPA
# kernel (the lowering's default) and once as matmul / float32 softmax / matmul (our own model's decode attention),
# each in its own process and Inductor cache. Writes stages.txt, prof.txt, prof.json, prof_mm.txt, prof_mm.json,
# tuning.tgz under $OUT. The first process also profiles our own model's captured decode step (int4_weight_only: the
# GPU work a transformers step is compared with). Session 14's run of it did not happen (the device could not be started); b1 stood at 0.78x
# our own model's int4 row.
source benchmarks/h200_session.sh
record_versions
stage 230 prof python benchmarks/experiments/hf_step_profile.py --rows transformers,int4_weight_only --batches 1,128 \
    --out "$OUT/prof.json"
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_mm stage 140 prof_mm python benchmarks/experiments/hf_step_profile.py --batches 1,128 \
    --attention-form matmul --out "$OUT/prof_mm.json"
save_tuning
