"""`python -m qcompile` and the `qcompile` console script (see cli.py)."""
import os
import sys


def main() -> int:
    # OpenMP threads that spin at barriers (libgomp's default) stall for a whole time slice per parallel region
    # when the cores are shared with other work: a 64-token GEMM took 20 ms spinning vs 0.9 ms passive on a
    # loaded 2-core machine (benchmarks/cpu_smollm2.py). The policy is read once, when torch loads OpenMP, which
    # `python -m qcompile` has done by now: run again with it set, unless the user chose one.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "qcompile", *sys.argv[1:]])
    from .cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
