"""The file manifest of a checkpoint: every file's size and SHA-256, computed and verified by
all ranks in parallel (rank r hashes files r, r + world, ...), so a damaged file (truncated, or
corrupted in place at the same size) is named before megatron reads it."""
from __future__ import annotations

import hashlib
import os

from ..coordination import gather_objects, on_rank0


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _my_share(names: list) -> list:
    import torch.distributed as dist

    return names[dist.get_rank()::dist.get_world_size()]


def list_files(root: str) -> list:
    """Every file under `root`, relative, sorted (rank 0's listing, on every rank)."""
    def walk():
        return sorted(os.path.relpath(os.path.join(d, n), root)
                      for d, _, names in os.walk(root) for n in names)
    return on_rank0(walk)


def build_manifest(root: str, names: list) -> dict:
    """{name: {"bytes": size, "sha256": digest}} of `names` under `root` (collective)."""
    mine = {name: {"bytes": os.path.getsize(os.path.join(root, name)),
                   "sha256": _sha256(os.path.join(root, name))} for name in _my_share(names)}
    return {name: entry for part in gather_objects(mine) for name, entry in part.items()}


def _problem(root: str, name: str, entry) -> str | None:
    path = os.path.join(root, name)
    expected = entry if isinstance(entry, int) else entry["bytes"]  # format 1: sizes only
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected:
        return f"{path} has {size} bytes, {expected} were written"
    if isinstance(entry, dict) and _sha256(path) != entry["sha256"]:
        return f"{path} does not match its SHA-256 (corrupted in place)"
    return None


def verify_manifest(root: str, manifest: dict) -> list:
    """The problems of the files of `manifest` under `root` (missing, other size, other
    SHA-256), the same list on every rank (collective)."""
    names = sorted(manifest)
    mine = [p for p in (_problem(root, n, manifest[n]) for n in _my_share(names)) if p]
    return sorted(p for part in gather_objects(mine) for p in part)
