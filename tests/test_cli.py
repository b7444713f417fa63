"""`python -m qcompile` on a tiny model: the table, --json with the same figures, the diff subcommand, and
errors that say what to fix."""
import json
import pickle
import subprocess
import sys

import pytest
import torch

from qcompile import cli, models

SMALL = models.TinyLlamaConfig(vocab_size=256, hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1)


@pytest.fixture
def small_tiny(monkeypatch):
    """The embedded model at CI size (compiles in seconds)."""
    build = models.tiny_llama
    monkeypatch.setattr(models, "tiny_llama", lambda: build(SMALL))


def test_table_and_json(small_tiny, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    rc = cli.main(["--model", "tiny", "--schemes", "int8_weight_only,int4_weight_only", "--seq-len", "16",
                   "--repeats", "2", "--json", str(out_json)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "1/3" in captured.err and "3/3" in captured.err  # progress on stderr, not in the table
    data = json.loads(out_json.read_text())
    rows = {r["scheme"]: r for r in data["rows"]}
    assert list(rows) == ["float", "int8_weight_only", "int4_weight_only"]
    assert data["is_language_model"] is False and rows["float"]["perplexity"] is None
    float_bytes = rows["float"]["weight_bytes"]
    assert float_bytes == sum(p.numel() * 4 for p in models.TinyLlama(SMALL).parameters()) + \
        SMALL.hidden // SMALL.heads // 2 * 4  # + the rope frequencies buffer
    assert rows["int4_weight_only"]["options"] == {"group_size": 64}  # 128 does not divide hidden=64
    for name, lo_db in (("int8_weight_only", 35), ("int4_weight_only", 12)):
        r = rows[name]
        assert r["error"] is None and r["output_sqnr_db"] > lo_db
        assert r["linears_quantized"] == r["linears_total"] == 8  # 7 per block + lm_head
        assert r["weight_bytes"] < float_bytes
        assert r["latency_ms"] > 0 and r["speedup"] > 0 and r["compile_s"] > 0
    assert rows["int4_weight_only"]["weight_bytes"] < rows["int8_weight_only"]["weight_bytes"]
    for name, r in rows.items():  # the table shows the JSON's figures
        if name != "float":
            assert f"{r['output_sqnr_db']:.1f}" in captured.out and f"{r['speedup']:.2f}x" in captured.out


def test_diff_subcommand(small_tiny, tmp_path, capsys):
    html = tmp_path / "report.html"
    assert cli.main(["diff", "--model", "tiny", "--scheme", "int8_dynamic", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    for module in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "lm_head"):
        assert module in out and module in html.read_text()
    assert "output SQNR (all quantized)" in out


def test_scheme_options_pick_a_group_size_that_fits():
    int4 = cli.get_scheme("int4_weight_only")
    assert cli.scheme_options(int4, [576, 1536])["group_size"] == 64
    assert "group_size" not in cli.scheme_options(int4, [256, 768])  # the default 128 fits
    assert "group_size" not in cli.scheme_options(cli.get_scheme("int8_dynamic"), [576])


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "int3"], "unknown scheme 'int3'; valid schemes: int8_weight_only"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or folder"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["diff", "--model", "tiny", "--scheme", "int4_weight_only", "--group-size", "48"],
     "group_size=48 is not valid for scheme 'int4_weight_only'"),
])
def test_errors_say_what_to_fix(argv, message, small_tiny):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert message in str(err.value)


def test_missing_gguf_dependency_names_the_package(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(models, "GGUF_PACKAGES", {"transformers": "transformers", "no_such_mod_xyz": "gguf"})
    with pytest.raises(SystemExit, match="needs: pip install gguf"):
        models.load_model(gguf)


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_checkpoint_is_refused_before_anything_unpickles_it(tmp_path):
    """A model folder whose weights are a pickle (pytorch_model.bin) is refused, by name; qcompile reads weights
    from a user's path through safetensors / GGUF only, and torch.load(weights_only=True) elsewhere."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 256}))
    marker = tmp_path / "code_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(pickle.dumps(Payload(tmp_path / "sanity")))  # the payload is live: a plain unpickle runs it
    assert (tmp_path / "sanity").exists()
    with pytest.raises(SystemExit, match=r"refusing to load .*model: its weights are pickle files "
                                         r"\(pytorch_model.bin\), which can run code when loaded"):
        cli.main(["diff", "--model", str(folder), "--scheme", "int8_weight_only"])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(folder / "pytorch_model.bin", weights_only=True)  # the benchmarks' inputs load this way
    assert not marker.exists()


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "qcompile", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--schemes" in done.stdout and "diff" in done.stdout
