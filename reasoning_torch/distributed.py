"""torch.distributed under torchrun / accelerate launch: gloo on a CPU, NCCL on GPUs, one process per device."""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from shared.runtime.distributed import launched_processes

# a rank that stops answering (killed, hung) fails the others' next collective after this long
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("LOCAL_REASONING_COLLECTIVE_TIMEOUT", "600")))


def join_process_group() -> tuple[int, int]:
    """(rank, world size): the launcher's process group, joined once; (0, 1) without a launcher."""
    if launched_processes() == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    """After the last collective of a run that succeeded on every rank: a group left to the interpreter's exit
    can abort the process ('terminate called without an active exception') after its work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def process_device() -> torch.device | None:
    """This process's GPU under a launcher (LOCAL_RANK), else None: the backend picks."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return None


def all_sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Every process's gradients summed, in one flat all-reduce (a process without rows sends zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()
