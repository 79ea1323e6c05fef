"""Sharding `niah`, `eval` and `sweep-ratios` over torchrun ranks: who runs what, and the per-rank results files.

Under ``torchrun --nproc-per-node N -m kvreviver_cli ...`` every rank reads its place from the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK); WORLD_SIZE absent or 1 is the single-process run. The work items of a command
(niah grid points, eval prompt batches) are split by :func:`assign`, which every rank computes alike from the item
costs, so no messages are needed to agree on it. Each rank appends its rows to its own file next to the results
file (``results.rank1-of-2.jsonl``); rank 0 waits at a barrier and folds every rank file into ``results.jsonl``.
torch.distributed serves only for the barriers, over gloo (no tensors move, so no NCCL either).

A kill leaves rank files behind: the next run of any size folds them into ``results.jsonl`` before it starts (rank
0, then a barrier), so their rows count as done and are never recomputed. Folding writes the new results file
whole and renames it over the old one before it deletes a rank file, so a kill at any moment loses no row.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Sequence

from kvreviver_core.results import ResultStore

# Ranks wait at the end for the slowest one: a generous limit, since torchrun ends the job if any rank dies.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job; ``world_size == 1`` is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")

    @classmethod
    def from_env(cls) -> "RankInfo":
        """Read RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (absent: a single process)."""
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size == 1:
            return cls()
        rank = _env_int("RANK", None)
        return cls(rank=rank, world_size=world_size, local_rank=_env_int("LOCAL_RANK", rank))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        if default is None:
            raise ValueError(f"{name} is not set; start several processes with torchrun, which sets it")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def rank_device(device: str, info: RankInfo) -> str:
    """The device this rank runs on: ``cuda:LOCAL_RANK`` when ``device`` resolves to CUDA, else ``device``.

    That GPU also becomes the current CUDA device, so calls that name no device (synchronize, memory stats) use it.
    """
    if not info.distributed:
        return device
    import torch

    from kvreviver_core.models import resolve_device

    if resolve_device(device).type != "cuda":
        return device
    if info.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {info.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"start at most that many processes per node")
    torch.cuda.set_device(info.local_rank)
    return f"cuda:{info.local_rank}"


# -- who runs what -----------------------------------------------------------------------------------------------------
def assign(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank of each work item: items in decreasing estimated cost (ties: lower index first), dealt out in
    snake order (ranks 0..W-1, then W-1..0, and so on).

    Deterministic, so every rank computes the same assignment. Every rank gets the same number of items (within one)
    and a share of every cost class, and the loads differ by at most the largest cost. Counts matter as much as the
    token costs: on a GPU a small model's answer time is mostly its decode steps, which every item has.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if any(cost < 0 for cost in costs):
        raise ValueError("work item costs must be >= 0")
    owner = [0] * len(costs)
    for turn, index in enumerate(sorted(range(len(costs)), key=lambda i: (-costs[i], i))):
        lap, seat = divmod(turn, world_size)
        owner[index] = seat if lap % 2 == 0 else world_size - 1 - seat
    return owner


def my_items(costs: Sequence[float], info: RankInfo) -> list[int]:
    """Indices of the items this rank runs, in their original order."""
    return [i for i, rank in enumerate(assign(costs, info.world_size)) if rank == info.rank]


# -- per-rank results files --------------------------------------------------------------------------------------------
def rank_file(results: Path, info: RankInfo) -> Path:
    """``results.jsonl`` -> ``results.rank1-of-2.jsonl`` next to it."""
    return results.with_name(f"{results.stem}.rank{info.rank}-of-{info.world_size}{results.suffix}")


def rank_files(results: Path) -> list[Path]:
    """Every rank file of ``results`` on disk, whatever the world size that wrote it, by world size then rank."""
    pattern = re.compile(re.escape(results.stem) + r"\.rank(\d+)-of-(\d+)" + re.escape(results.suffix))
    found = []
    for path in results.parent.glob(f"{results.stem}.rank*-of-*{results.suffix}"):
        match = pattern.fullmatch(path.name)
        if match:
            found.append(((int(match[2]), int(match[1])), path))
    return [path for _, path in sorted(found)]


def fold_rank_files(results: Path, key_fields: Iterable[str]) -> int:
    """Move the rows of every rank file into ``results`` (those whose key it lacks), then delete the rank files.

    ``results`` keeps its bytes and gains the new rows at its end, rank file by rank file. It is written whole to a
    temporary file that replaces it in one rename, so a kill leaves either the old file with the rank files or the
    new one (whose rows the next fold skips). Returns the number of rows added.
    """
    merged = ResultStore(results, key_fields)  # drops a torn last line left by a kill, before any rank reads it
    sources = rank_files(results)
    if not sources:
        return 0
    done = merged.done_keys()
    added = []
    for source in sources:
        for row in ResultStore(source, key_fields).rows:
            key = merged.key(row)
            if key not in done:
                done.add(key)
                added.append(row)
    if added:
        text = results.read_text() if results.exists() else ""
        _write_atomically(results, text + "".join(json.dumps(row, sort_keys=True) + "\n" for row in added))
    for source in sources:
        source.unlink()
    return len(added)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk before any rank file is deleted
    finally:
        os.close(directory)


def rank_store(results: Path, key_fields: Iterable[str], info: RankInfo) -> ResultStore:
    """This rank's store: appends go to its rank file; rows already in ``results`` count as done too."""
    store = ResultStore(rank_file(results, info), key_fields)
    store.rows = ResultStore(results, key_fields).rows + store.rows
    return store


class RankSession:
    """``with RankSession(results, key_fields, info) as store:`` run this rank's items into ``store``.

    On entry: join the gloo process group; rank 0 folds leftover rank files into ``results``; a barrier. On a
    clean exit: a barrier (every rank done), then rank 0 folds every rank file into ``results``. The group is
    left in any case; on an error the rank file keeps what was finished, for the next run.
    """

    def __init__(self, results: Path, key_fields: Iterable[str], info: RankInfo) -> None:
        if not info.distributed:
            raise ValueError("a rank session needs WORLD_SIZE > 1 (start it with torchrun)")
        self.results = Path(results)
        self.key_fields = tuple(key_fields)
        self.info = info

    def __enter__(self) -> ResultStore:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.info.rank, world_size=self.info.world_size,
                                    timeout=BARRIER_TIMEOUT)
        try:
            if self.info.main:
                self.results.parent.mkdir(parents=True, exist_ok=True)
                fold_rank_files(self.results, self.key_fields)
            dist.barrier()
            return rank_store(self.results, self.key_fields, self.info)
        except BaseException:
            dist.destroy_process_group()
            raise

    def __exit__(self, exc_type, exc, traceback) -> None:
        import torch.distributed as dist

        try:
            if exc_type is None:
                dist.barrier()
                if self.info.main:
                    fold_rank_files(self.results, self.key_fields)
        finally:
            dist.destroy_process_group()
