"""What every benchmark here shares, so that each script states only its own work: a log with the run's clock,
timing (wall time with the device synced; kernels as medians of CUDA-graph replays), memory counters, one CUDA
graph around a step, the run's records (device, versions, commit; a JSON file saved row by row) and markdown (a
table, a section of BENCHMARKS.md)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
START = time.monotonic()
INVOCATION = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # groups one run's rows


def log(message: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} +{time.monotonic() - START:6.1f}s] {message}", flush=True)


# --- timing ---------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Wall time of one call of `fn`, the device synced before and after (its queued work counts)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def kernel_us(fn: Callable[[], object]) -> float:
    """Median microseconds of `fn` on the GPU, timed as CUDA-graph replays (event timing around launches measures
    the CPU's launch overhead at these kernel lengths); event timing where `fn` cannot be captured."""
    import triton

    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3
    except Exception:
        return triton.testing.do_bench(fn, warmup=25, rep=80, return_mode="median") * 1e3


def captured_step(step: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """`step` (a decode step whose compiled pieces have already compiled) captured as one CUDA graph; returns a
    call that replays it and gives the graph's static output. The step reads its inputs (ids, position, KV cache)
    from fixed addresses, as the CUDA-graph trees of whole-model rows do. Warm-up on a side stream, as
    torch.cuda.graph's documentation asks (it writes the cache at the current position: generate refills it)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


# --- memory -----------------------------------------------------------------------------------------------------

def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 1e9, 3)


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --- records ----------------------------------------------------------------------------------------------------

def device_name(device) -> str:
    if device.type != "cuda":
        return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    name = torch.cuda.get_device_name(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split()[0]
        return f"{name} (driver {driver})"
    except (OSError, IndexError, subprocess.SubprocessError):
        return name


def version_of(package: str) -> str | None:
    """The installed distribution's version, without importing it; None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": _imported_version("transformers"),
            "torchao": version_of("torchao"), "python": platform.python_version(),
            "triton": _imported_version("triton")}


def _imported_version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def write_json(path: Path, data) -> None:
    """Replace `path` atomically: a run stopped while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path} is not a list of row records (written by this script?)")
    return data


def saver(path: Path):
    """save(record): replace this invocation's record of the row in `path` (or append it), atomically."""
    def save(record: dict) -> None:
        records = [r for r in load_records(path)
                   if not (r["row"] == record["row"] and r["started"] == record["started"])]
        write_json(path, records + [record])
    return save


# --- markdown ---------------------------------------------------------------------------------------------------

def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; cells as given (str() of each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def write_section(path: Path, name: str, text: str) -> None:
    """The one way benchmarks write their results into a markdown file (BENCHMARKS.md): a section between two
    markers named after the benchmark, replaced in place on a rerun, appended at the end the first time."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    path.write_text(new)
