"""QCOMPILE_DEBUG=<dir>: every compile by the backend leaves its graphs and report in that folder."""
import json

import torch

from .test_report import Net


def test_debug_folder_fills_on_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_DEBUG", str(tmp_path))
    monkeypatch.setenv("QCOMPILE_DEBUG_TARGET_SQNR", "none")
    net, x = Net(), torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = net(x)
        out = torch.compile(net, backend="qcompile", options={"scheme": "int8_weight_only"})(x)
    assert torch.allclose(out[0], expected[0], atol=0.05)  # the compile itself still works
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("graph-000-int8_weight_only")
    assert sorted(p.name for p in folder.iterdir()) == [
        "after.py", "before.py", "pass.diff", "report.html", "report.json", "report.txt"]
    assert "torch.ops.qcompile.dequantize_int8" in (folder / "after.py").read_text()
    assert "torch.ops.qcompile" not in (folder / "before.py").read_text()
    assert "+++ after the pass" in (folder / "pass.diff").read_text()
    text = (folder / "report.txt").read_text()
    for module in ("up", "down", "odd"):
        assert f"  {module} " in text
    data = json.loads((folder / "report.json").read_text())
    layers = data["graphs"][0]["layers"]
    assert [la["module"] for la in layers] == ["up", "down", "odd"]
    assert all(la["output_sqnr_db"] > 35 and la["weight_sqnr_db"] > 35 for la in layers)
    assert data["suggestion"] is None and data["output_sqnr_db"] > 35


def test_no_folder_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    with torch.no_grad():
        torch.compile(Net(), backend="qcompile", options={"scheme": "int8_weight_only"})(torch.randn(2, 64))
    assert list(tmp_path.iterdir()) == []
