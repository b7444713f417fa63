"""`QCOMPILE_DEBUG=<dir>`: every graph the backend compiles leaves its report and graphs in a folder of <dir>,
measured on the inputs Dynamo compiled it for. `QCOMPILE_DEBUG_TARGET_SQNR` (dB, or "none") sets the
suggestion's target (default 30 dB)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .. import released
from ..backend import PassObserver
from ..options import QuantOptions
from ..passes.records import PassResult
from .capture import capture_graph
from .report import DEFAULT_TARGET_SQNR_DB, ModelUnderTest, build_report, describe_inputs

ENV_FOLDER = "QCOMPILE_DEBUG"
ENV_TARGET = "QCOMPILE_DEBUG_TARGET_SQNR"


def _target_from_env() -> float | None:
    text = os.environ.get(ENV_TARGET, "").strip()
    if not text:
        return DEFAULT_TARGET_SQNR_DB
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{ENV_TARGET}={text!r}: expected a number of dB or 'none'") from None


def _new_folder(root: Path, scheme: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n = len(list(root.glob("graph-*")))
    while True:  # another process may take the same number: mkdir is the arbiter
        folder = root / f"graph-{n:03d}-{scheme}-pid{os.getpid()}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def write_compile_report(root, gm: torch.fx.GraphModule, example_inputs, options: QuantOptions,
                         result: PassResult) -> Path:
    """Write before.py, after.py, pass.diff and the report (txt, html, json) for one compiled graph; called by
    the backend right after the pass, while the float weights are still there."""
    folder = _new_folder(Path(root), options.scheme)
    inputs = list(example_inputs)
    capture = capture_graph(0, gm, inputs, options, result)
    (folder / "before.py").write_text(capture.before + "\n")
    (folder / "after.py").write_text(capture.after + "\n")
    (folder / "pass.diff").write_text(capture.diff + "\n")
    if any(isinstance(t, FakeTensor) for t in inputs):
        (folder / "report.txt").write_text("no figures: this compile saw fake inputs only, nothing to run\n")
        return folder
    if capture.released:  # a recompile of a model whose float weights an earlier compile freed
        (folder / "report.txt").write_text(f"no figures: the float weights of {capture.released} were released by "
                                           f"an earlier compile; {released.KEEP_FLOAT_WEIGHTS}\n")
        return folder
    with torch.no_grad():
        reference = capture.run(inputs, lambda site: False, record=True)
    model = ModelUnderTest(lambda quantized: capture.run(inputs, quantized), reference)
    report = build_report([capture], model, options, _target_from_env(),
                          "the graph's non-parameter inputs: " + describe_inputs(
                              [t for t in inputs if not isinstance(t, torch.nn.Parameter)], {}))
    (folder / "report.txt").write_text(str(report) + "\n")
    report.to_html(folder / "report.html")
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return folder


def _observe_compile(gm: torch.fx.GraphModule, example_inputs, options: QuantOptions, result: PassResult,
                     signature) -> None:
    if signature is not None:
        warnings.warn("qcompile: QCOMPILE_DEBUG writes no report for tensor-parallel (DTensor) graphs: its float "
                      "replay runs one process", stacklevel=3)
        return
    write_compile_report(os.environ[ENV_FOLDER], gm, example_inputs, options, result)


# every compile while QCOMPILE_DEBUG is set (qcompile/__init__.py hands it to the backend)
PASS_OBSERVER = PassObserver(active=lambda: bool(os.environ.get(ENV_FOLDER)), observe=_observe_compile)
