"""Autotuning: candidates per M bucket fit the shape, the fastest is chosen, and the choice is read back from
disk by a fresh cache (a second process does not tune again)."""
import json

from qcompile.kernels.triton import tuning
from qcompile.kernels.triton.linear import LinearSpec


def test_choice_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    cache = tuning.ConfigCache(tmp_path / "configs.json")
    monkeypatch.setattr(tuning, "CACHE", cache)
    spec = LinearSpec("float", "int4_tinygemm", bits=4, group_size=128)
    options = tuning.candidates(spec, 1, 4096, 4096)
    fastest = options[-1]
    measured = []

    def measure(config):
        measured.append(config)
        return 1.0 if config == fastest else 2.0

    assert tuning.select_config(spec, 1, 4096, 4096, "H200", measure) == fastest
    assert measured == options
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache(tmp_path / "configs.json"))  # a new process

    def must_not_measure(config):
        raise AssertionError("tuned again despite the cache")

    assert tuning.select_config(spec, 1, 4096, 4096, "H200", must_not_measure) == fastest
    assert tuning.select_config(spec, 1, 4096, 4096, "other GPU", None) == options[0]  # keyed by device


def test_buckets_and_library_candidates():
    assert [tuning.m_bucket(m) for m in (1, 2, 9, 16, 17, 128, 300, 8192)] == [1, 16, 16, 16, 64, 256, 8192, 8192]
    fp8 = LinearSpec("fp8_row", "fp8")
    assert "scaled_mm" in [c.library for c in tuning.candidates(fp8, 8192, 4096, 4096)]
    assert all(c.block_m <= 16 for c in tuning.candidates(fp8, 16, 4096, 4096))


def test_tuning_tensors_keep_shape_dtype_strides_and_are_filled_in_blocks(monkeypatch):
    """The autotuner times candidates on random stand-ins of the real tensors: same shape, dtype and strides
    (column-major group parameters), every element written, no zeros-only tensor; filled in blocks of rows so
    an LM head's weight does not make a multi-GB temporary (the e2e int8 peak was +4.2 GB from one int64)."""
    import torch

    from qcompile.kernels.triton import ops

    monkeypatch.setattr(ops, "RANDOM_CHUNK_ELEMENTS", 64)
    column_major = torch.zeros(64, 8, dtype=torch.bfloat16).t().contiguous().t()
    for t in (torch.zeros(300, 50, dtype=torch.uint8), torch.zeros(20, 64, dtype=torch.int8), column_major,
              torch.zeros(40, 33, dtype=torch.float8_e4m3fn), torch.zeros(7, dtype=torch.bfloat16),
              torch.zeros((), dtype=torch.float32)):
        r = ops._random_like(t)
        assert (r.shape, r.stride(), r.dtype) == (t.shape, t.stride(), t.dtype)
        values = r.float()
        assert values.std() > 0.1 if values.numel() > 1 else values.item() >= 0.5
        assert (values != 0).float().mean() > 0.9  # every block written (not left as empty memory of zeros)


def test_an_edited_kernel_is_tuned_again(tmp_path, monkeypatch):
    """Choices are keyed by a hash of the kernel sources (not of the candidate lists in tuning.py): one tuned for
    other kernel code is not reused."""
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache(tmp_path / "configs.json"))
    spec = LinearSpec("float", "int4_tinygemm", bits=4, group_size=128)
    options = tuning.candidates(spec, 1, 4096, 4096)
    assert tuning.select_config(spec, 1, 4096, 4096, "H200", lambda c: 1.0 if c == options[-1] else 2.0) \
        == options[-1]
    assert len(tuning.template_version()) == 12
    monkeypatch.setattr(tuning, "template_version", lambda: "edited")
    measured = []
    tuning.select_config(spec, 1, 4096, 4096, "H200", lambda c: measured.append(c) or 1.0)
    assert measured == options  # tuned again, not read back


def test_a_new_candidate_meets_the_cached_choice_alone(tmp_path, monkeypatch):
    """A candidate added after tuning is measured against the cached choice only (timed again beside it), and
    wins only if faster; once measured, nothing is tuned again."""
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache(tmp_path / "configs.json"))
    spec = LinearSpec("float", "fp8")
    options = tuning.candidates(spec, 1, 4096, 4096)
    chosen = options[3]
    assert tuning.select_config(spec, 1, 4096, 4096, "H200", lambda c: 1.0 if c == chosen else 2.0) == chosen
    added = tuning.KernelConfig(1, 16, 64, 1, num_warps=2, num_stages=1)
    assert added not in options
    monkeypatch.setattr(tuning, "candidates", lambda *args: options + [added])
    assert tuning.untried_candidates(spec, 1, 4096, 4096, "H200") == [added]
    assert tuning.select_config(spec, 1, 4096, 4096, "H200", None) == chosen  # nothing to measure with: cached
    measured = []

    def measure(config):
        measured.append(config)
        return 0.5 if config == added else 1.0

    assert tuning.select_config(spec, 1, 4096, 4096, "H200", measure) == added
    assert measured == [chosen, added]
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache(tmp_path / "configs.json"))  # a new process

    def must_not_measure(config):
        raise AssertionError("tuned again despite the cache")

    assert tuning.select_config(spec, 1, 4096, 4096, "H200", must_not_measure) == added
    assert tuning.untried_candidates(spec, 1, 4096, 4096, "H200") == []


def test_candidates_are_timed_outside_every_tracing_mode(monkeypatch):
    """fused_linear tunes while Inductor traces it (fake tensors under proxy and functional modes). The timed
    launches must run on real tensors with no mode active: under the proxy mode every launch was traced into the
    graph (a TTIR build per call: most of the H200's compile time) and captured into the timing CUDA graph."""
    import torch
    import triton.testing
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from qcompile.kernels.triton import ops

    seen = []

    def spy_run_linear(x, qweight, *args):
        seen.append((type(x), type(qweight), _get_current_dispatch_mode_stack()))
        return torch.ones(x.shape[0], qweight.shape[0])

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kwargs: (fn(), fn(), 1.0)[-1])
    spec = LinearSpec("float", "int8")
    config = tuning.candidates(spec, 4, 32, 64)[0]

    def traced(x, qweight, w_scale):
        ops._measure_on_random((x, qweight, w_scale, None, None, None), spec, torch.bfloat16, spy_run_linear)(config)
        return x * 2

    x, qweight = torch.randn(4, 64, dtype=torch.bfloat16), torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    graph = make_fx(traced, tracing_mode="fake")(x, qweight, torch.rand(32, 1))
    assert len(seen) == 3  # the compile run and the two timed ones
    assert all((x_type, w_type) == (torch.Tensor, torch.Tensor) and not modes for x_type, w_type, modes in seen), seen
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [torch.ops.aten.mul.Tensor]


def test_shipped_choices_answer_what_the_users_file_lacks(tmp_path):
    """The package's seeds (tuned/*.json, one per GPU) answer keys the user's file lacks, so a first compile on the
    H100 / H200 finds those choices; an entry in the user's file wins; the seeds are never written."""
    shipped = {path.name: path.read_text() for path in tuning.SHIPPED}
    assert {"h100.json", "h200.json"} <= set(shipped)
    assert tuning.CACHE.shipped == tuning.SHIPPED
    current = f"|kernels {tuning.template_version()}|"
    entries = json.loads(shipped["h200.json"])
    key = next(k for k in entries if current in k)  # keyed for today's kernels (h200_seed.py --rekey-from)
    cache = tuning.ConfigCache(tmp_path / "configs.json", shipped=tuning.SHIPPED)
    config, tried = cache.get_entry(key)
    assert config == tuning.KernelConfig(**entries[key]["config"]) and tried == frozenset(entries[key]["tried"])
    assert tuning.ConfigCache(tmp_path / "configs.json").get(key) is None  # without seeds: tuned

    own = tuning.KernelConfig(**{**entries[key]["config"], "num_warps": 1 + entries[key]["config"]["num_warps"]})
    cache.put(key, own, tried)
    assert tuning.ConfigCache(tmp_path / "configs.json", shipped=tuning.SHIPPED).get(key) == own
    assert {path.name: path.read_text() for path in tuning.SHIPPED} == shipped
