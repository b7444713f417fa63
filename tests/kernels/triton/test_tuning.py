"""Autotuning: candidates per M bucket fit the shape, the fastest is chosen, and the choice is read back from
disk by a fresh cache (a second process does not tune again)."""
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
