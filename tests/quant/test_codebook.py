"""Codebook quantization: k-means centroids and the round trip."""
import torch

from qcompile.quant import affine, codebook
from qcompile.quant.metrics import sqnr_db


def test_codebook_round_trip_beats_uniform_4bit_per_row():
    w = torch.randn(64, 256)
    packed, book, scale = codebook.quantize_codebook(w)
    assert packed.shape == (64, 128) and book.shape == (16,) and torch.all(book[1:] >= book[:-1])
    dq = codebook.dequantize_codebook(packed, book, scale, torch.float32)
    s = affine.choose_qparams_symmetric(w, 256, 4)
    uniform = affine.dequantize_symmetric(affine.quantize_symmetric(w, s, 256, 4), s, 256, torch.float32)
    assert sqnr_db(w, dq) > sqnr_db(w, uniform) + 1  # Lloyd-Max beats a uniform grid on Gaussian data
    # every weight maps to its nearest centroid
    normalised = w / scale[:, None]
    nearest = book[(normalised[..., None] - book).abs().argmin(-1)]
    assert torch.allclose(dq, nearest * scale[:, None])


def test_kmeans_is_deterministic_and_handles_zeros():
    v = torch.randn(5000)
    assert torch.equal(codebook.kmeans_1d(v, 16), codebook.kmeans_1d(v, 16))
    w = torch.zeros(4, 32)
    packed, book, scale = codebook.quantize_codebook(w)
    assert (codebook.dequantize_codebook(packed, book, scale, torch.float32) == 0).all()
