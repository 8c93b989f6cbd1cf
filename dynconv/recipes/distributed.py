"""Process-group set-up shared by the recipes: the same code runs single-process and under ``torchrun``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynconv.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA);
    a plain ``python`` run gets a single-process :class:`DistInfo` and no process group."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistInfo()
        info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as exc:
        raise UserError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} with RANK={os.environ.get('RANK')!r}: the process-group "
            "variables are incomplete or not integers; launch with torchrun, or unset WORLD_SIZE"
        ) from exc
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def time_limit_reached(time_limit: float | None, started: float, info: DistInfo) -> bool:
    """``--time-limit``: whether the run stops after this step. Rank 0's clock decides (``time.monotonic()`` since
    ``started``) and every rank gets its answer, so all stop at the same step; ``None`` never stops (and makes no
    collective call, on any rank)."""
    return (
        time_limit is not None
        and all_reduce_mean(float(info.is_main and time.monotonic() - started > time_limit), info) > 0
    )


# Seconds a rank gives the process group's worker threads after leaving it (see cleanup).
WORKER_GRACE_S = 0.25


def cleanup(info: DistInfo) -> None:
    """Leave the process group (every recipe's ``train`` calls this last, in ``finally``), then give its worker
    threads the GIL for :data:`WORKER_GRACE_S` before the process may exit.

    Why the pause: a gloo worker thread drops its reference to a finished collective (and so to the Python
    tensors it reduced, which takes the GIL) only after the caller's ``wait`` has returned, and
    ``destroy_process_group`` does not join those threads. If the interpreter is already finalizing when that
    thread asks for the GIL, the thread is unwound inside a C++ destructor and the process aborts
    ("terminate called without an active exception", SIGABRT). Measured with torch 2.13 on a 2-core machine: 1
    run in 11 of the two-process ``train video-prediction`` test, and 5 exits in 10 right after an
    ``all_reduce`` (none with the pause; ``tests/test_distributed_exit.py``)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(WORKER_GRACE_S)
