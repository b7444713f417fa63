"""Take the tuning caches a device call brought back (h200_session.sh's save_tuning: $OUT/tuning.tgz, unpacked)
into this checkout: .cache/qcompile (carried to the next call) and the seed the package ships for the GPU that
tuned them — qcompile/kernels/triton/tuned/h200.json or h100.json (the device lends both; a choice is keyed by the
GPU's name, and one GPU's seed must not grow with the other's entries). Our configs keep only the keys of the
current kernels (`tuning.template_version()`: entries of older kernel code are never read again); gemlite's (keyed
by shape only) are merged by kernel kind into benchmarks/h200_cache/ (the benchmarks' peer, not shipped).

    mkdir -p /tmp/tuning && tar -xzf /work/.device/N/tuning.tgz -C /tmp/tuning
    python benchmarks/h200_seed.py /tmp/tuning
    python benchmarks/h200_seed.py --rekey-from OLDHASH   # after a kernel edit that left the SASS as it was
                                                          # (benchmarks/experiments/sass_fingerprint.py)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qcompile.kernels.triton.tuning import TUNED_DIR, template_version

CACHE = Path(".cache/qcompile")
SEEDS = {"H100": TUNED_DIR / "h100.json", "H200": TUNED_DIR / "h200.json"}  # ours, shipped in the package
GEMLITE_SEED = Path("benchmarks/h200_cache/gemlite_configs.json")


def seed_of(key: str) -> Path:
    """The shipped seed file for an entry of triton_linear_configs.json (its key starts with the GPU's name)."""
    device = key.split("|", 1)[0]
    return next((path for gpu, path in SEEDS.items() if gpu in device), SEEDS["H200"])


def destinations(name: str, new: dict, nested: bool):
    """(file, the entries of `new` it takes): the carried cache all; each GPU's shipped seed its own; gemlite's file
    (keyed by shape only) the benchmarks' seed."""
    yield CACHE / name, new
    if nested:
        yield GEMLITE_SEED, new
        return
    for path in SEEDS.values():
        mine = {key: value for key, value in new.items() if seed_of(key) == path}
        if mine:
            yield path, mine


def current_kernels_only(entries: dict) -> dict:
    marker = f"|kernels {template_version()}|"
    return {key: value for key, value in entries.items() if marker in key}


def merged(old: dict, new: dict, nested: bool) -> dict:
    if not nested:
        return {**old, **new}
    return {kind: {**old.get(kind, {}), **new.get(kind, {})} for kind in {*old, *new}}


def rekey(old: str) -> None:
    new = template_version()
    for target in (CACHE / "triton_linear_configs.json", *SEEDS.values()):
        if not target.exists():
            continue
        entries = json.loads(target.read_text())
        moved = {key.replace(f"|kernels {old}|", f"|kernels {new}|"): value for key, value in entries.items()
                 if f"|kernels {old}|" in key}
        target.write_text(json.dumps({**current_kernels_only(entries), **moved}, indent=1, sort_keys=True))
        print(f"{target}: {len(moved)} entries moved from kernels {old} to {new}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tuning", type=Path, nargs="?",
                    help="the folder holding triton_linear_configs.json / gemlite_configs.json")
    ap.add_argument("--rekey-from", metavar="HASH", help="move the seed's entries of kernel hash HASH to the "
                    "current one (only after checking that the edit left the compiled kernels as they were)")
    args = ap.parse_args(argv)
    if args.rekey_from:
        rekey(args.rekey_from)
        return
    if args.tuning is None:
        ap.error("give the tuning folder, or --rekey-from")
    for name, nested in (("triton_linear_configs.json", False), ("gemlite_configs.json", True)):
        source = args.tuning / name
        if not source.exists():
            print(f"{source}: not there, skipped")
            continue
        new = json.loads(source.read_text())
        if not nested:
            new = current_kernels_only(new)
        for target, entries in destinations(name, new, nested):
            target.parent.mkdir(parents=True, exist_ok=True)
            old = json.loads(target.read_text()) if target.exists() else {}
            if not nested:
                old = current_kernels_only(old)
            result = merged(old, entries, nested)
            target.write_text(json.dumps(result, indent=1, sort_keys=True))
            print(f"{target}: {len(result)} entries ({len(entries)} from {source})")


if __name__ == "__main__":
    main()
