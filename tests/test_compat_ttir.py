"""The memo in front of torch's generate_ttir (Inductor's analysis of which tensors a user Triton kernel writes,
run at every call site): one TTIR per kernel variant, keyed by what reaches the TTIR, for qcompile's kernels
only."""
import torch

from qcompile import _compat
from qcompile.kernels.triton.gemm import quantized_linear_kernel


class _Kernel:  # stands in for a JITFunction: .fn is the Python function
    def __init__(self, module):
        self.fn = type("F", (), {"__module__": module})()


def test_one_ttir_per_variant_of_our_kernels():
    calls = []

    def original(kernel, kwargs, tma):
        calls.append(dict(kwargs))
        return object(), list(kwargs)

    memo = _compat.memoized_generate_ttir(original)
    ours = _Kernel("qcompile.kernels.triton.gemm")
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake:
        x = torch.empty(4, 8, dtype=torch.bfloat16)
        x_other_shape = torch.empty(16, 8, dtype=torch.bfloat16)
    first = memo(ours, {"x": x, "N": 4096, "BLOCK": 64}, {})
    again = memo(ours, {"x": x_other_shape, "N": 4096, "BLOCK": 64}, {})  # another call site, same variant
    assert len(calls) == 1 and again[0] is first[0] and again[1] == first[1]
    memo(ours, {"x": x, "N": 4096, "BLOCK": 128}, {})  # another constexpr
    memo(ours, {"x": x, "N": 28672, "BLOCK": 64}, {})  # another specialised int
    with fake:
        memo(ours, {"x": torch.empty(4, 8, dtype=torch.float16), "N": 4096, "BLOCK": 64}, {})  # another dtype
    assert len(calls) == 4
    theirs = _Kernel("user_code")
    memo(theirs, {"N": 1}, {})
    memo(theirs, {"N": 1}, {})
    memo(ours, {"x": x, "N": 4096, "BLOCK": 64}, {"x": ("stable", ([16, 16],))})  # TMA: not memoized
    memo(ours, {"x": x, "N": 4096, "BLOCK": object()}, {})  # unknown argument kind: not memoized
    assert len(calls) == 8


def test_installed_in_front_of_torchs_generate_ttir():
    from torch._higher_order_ops import triton_kernel_wrap

    assert _compat.install_ttir_memo()
    assert getattr(triton_kernel_wrap.generate_ttir, "qcompile_memoized", False)
    assert _compat.install_ttir_memo()  # idempotent: not wrapped twice
    assert not hasattr(triton_kernel_wrap.generate_ttir.__wrapped__, "qcompile_memoized")
    assert quantized_linear_kernel.fn.__module__.startswith("qcompile.")  # what the memo keys on


def test_the_only_non_pure_asm_is_the_l1_prefetch():
    """What the patch assumes: an `is_pure=False` inline asm in qcompile's kernels writes no memory. Each
    one must be a prefetch."""
    import pathlib
    import re

    kernels = pathlib.Path(_compat.__file__).parent / "kernels"
    found = []
    for path in kernels.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"inline_asm_elementwise\((.*?)\)\n", text, re.S):
            call = match.group(1)
            if "is_pure=False" in call:
                found.append((path.name, call))
    assert found and all(re.match(r'\s*"prefetch\.global\.L1 \[\$1\]; mov\.u32 \$0, 0;"', call) for _, call in found), found


def test_graph_repro_string_skipped_unless_structured_tracing_listens(monkeypatch):
    """Inductor builds a runnable repro of every graph for tlparse alone; qcompile's compile skips it while no
    structured-trace handler listens, and keeps it (and every other use of save_graph_repro) otherwise."""
    import io
    import logging

    from torch._dynamo.repro import after_aot
    from torch._logging._internal import trace_log

    calls = []
    original = after_aot.save_graph_repro
    monkeypatch.setattr(after_aot, "save_graph_repro", lambda fd, *a, **k: calls.append(k.get("save_dir", "unset")))

    # nothing listens: only torch's lazy handler without a TORCH_TRACE folder (pytest's log capture, when on, adds
    # its own handlers to this logger, which would receive the records)
    monkeypatch.setattr(trace_log, "handlers", [h for h in trace_log.handlers if getattr(h, "root_dir", "") is None])

    def compile_once():
        gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
        _compat.compile_fx(gm, [torch.randn(3, 8)])(torch.randn(3, 8))

    compile_once()
    assert calls == []  # skipped: nothing listens
    with _compat._no_unlogged_graph_repro():
        after_aot.save_graph_repro(io.StringIO(), None, [], "inductor", save_dir="/tmp/x")
    assert calls == ["/tmp/x"]  # a repro with a save_dir goes through
    handler = logging.NullHandler()
    trace_log.handlers.append(handler)
    try:
        torch._dynamo.reset()
        torch._inductor.config.force_disable_caches, saved = True, torch._inductor.config.force_disable_caches
        try:
            compile_once()
        finally:
            torch._inductor.config.force_disable_caches = saved
    finally:
        trace_log.handlers.remove(handler)
    assert calls[1:] == [None]  # tracing listens: Inductor's own call goes through
    assert after_aot.save_graph_repro is not original  # (the monkeypatched stand-in is back in place)
