# One device call (issue 22, ~4 min with the start), carry [".whl"]: the int4 lab (benchmarks/experiments/
# int4_mma_lab.py) twice on the same GPU — first the kernels of .whl/old (a `git archive <commit> qcompile
# benchmarks/experiments/int4_mma_lab.py` unpacked there: the commit before the change under test), then this
# checkout's — so "today" (the shipped tuned choices) compares old and new kernel code in one run.
#     rm -rf .whl/old && mkdir -p .whl/old && git archive <old> qcompile benchmarks/experiments/int4_mma_lab.py | tar -x -C .whl/old
#     bash benchmarks/issue22_gemv_ab_call.sh
# Writes stages.txt, lab_old.{json,txt}, lab_new.{json,txt} under $OUT.
source benchmarks/h200_session.sh
record_versions
stage 110 lab_old env PYTHONPATH=/tmp/site python .whl/old/benchmarks/experiments/int4_mma_lab.py --budget-s 90 --out "$OUT/lab_old.json"
stage 110 lab_new python benchmarks/experiments/int4_mma_lab.py --budget-s 90 --out "$OUT/lab_new.json"
cat "$OUT/stages.txt"
