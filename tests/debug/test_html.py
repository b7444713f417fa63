"""The HTML report: one self-contained page, and a real browser (headless Chromium) renders it, not blank."""
import shutil
import struct
import subprocess
import zlib

import pytest
import torch

from qcompile.debug import diff

from .test_report import Net

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return diff(Net(), (torch.randn(2, 5, 64),), {"scheme": "int4_weight_only", "group_size": 64}, target_sqnr_db=60)


def test_page_is_self_contained_and_complete(report, tmp_path):
    path = tmp_path / "report.html"
    report.to_html(path)
    page = path.read_text()
    for forbidden in ("<script", "<link", "src=", "@import", "url("):
        assert forbidden not in page
    assert page.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert page.count("<svg") == 1 and page.count("<rect") == len(report.layers)
    for layer in report.layers:
        assert f">g0 {layer.module}<" in page  # a labelled bar per linear
    assert "in_features=96 is not divisible by group_size=64" in page  # why `odd` stays in float
    assert 'class="add"' in page and 'class="del"' in page  # the graph diff, coloured
    assert "{&#x27;exclude&#x27;: [&#x27;" in page  # 60 dB is out of reach: a suggestion is shown


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixels) of an 8-bit RGB/RGBA PNG: enough to look at a screenshot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6), f"unsupported PNG: depth {depth}, colour type {color}"
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    out, prev = bytearray(), bytearray(stride)
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
        out += line
        prev = line
    return width, height, channels, bytes(out)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_chromium_renders_the_page(report, tmp_path):
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    report.to_html(page)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,700",
           page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    width, height, channels, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (1000, 700)
    gray = [sum(pixels[i:i + 3]) // 3 for i in range(0, len(pixels), channels)]
    mean = sum(gray) / len(gray)
    variance = sum((g - mean) ** 2 for g in gray) / len(gray)
    assert variance > 100, f"screenshot looks blank (grey variance {variance:.1f})"
    # the bar chart's colours are on screen: red/orange/green bars, not just black text on white
    colours = {tuple(pixels[i:i + 3]) for i in range(0, len(pixels), channels)}
    assert any(r > 150 and g < 120 and b < 120 for r, g, b in colours) or \
        any(g > 130 and r < 100 and b < 100 for r, g, b in colours) or \
        any(r > 200 and 100 < g < 180 and b < 60 for r, g, b in colours)
