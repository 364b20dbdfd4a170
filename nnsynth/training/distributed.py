"""torch.distributed helpers: one code path for DDP on GPUs (NCCL) and on CPUs (gloo).

``launch`` starts ``world_size`` processes with ``torch.multiprocessing.spawn``; each calls
``fn(rank, world_size, *args)`` after ``init_process_group``. Rank 0 writes every file.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks (identity without a process group)."""
    if not is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def broadcast_object(obj: Any) -> Any:
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_tensors(tensors) -> None:
    """Give every rank rank 0's values of ``tensors`` in place (no-op without a process group)."""
    if not is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)   # .data: an in-place write autograd does not track


def all_reduce_gradients(params) -> None:
    """Average the gradients of ``params`` over ranks in place, for parameters DDP does not own (a trainer's
    own head); a rank on which a parameter got no gradient contributes zeros, so every rank steps alike."""
    if not is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size())


def _worker(local_rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: Tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=local_rank, world_size=world)
    try:
        fn(local_rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(world: int, fn: Callable[..., Any], args: Tuple = (), backend: str = "auto") -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined in one process group."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    logger.info("Starting %d processes (torch.distributed backend %s)", world, backend)
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), backend, fn, args), nprocs=world, join=True)
