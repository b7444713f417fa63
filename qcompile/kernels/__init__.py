"""Kernels: compute only, no graph knowledge. One package per device."""
