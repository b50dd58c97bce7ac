"""The trainer's view of torch.distributed: one process, or one rank of a torchrun job."""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


class Dist:
    """torch.distributed state: initialised from torchrun's environment when WORLD_SIZE > 1
    (NCCL on CUDA devices, gloo on CPUs)."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if want_cuda:
            self.device = torch.device("cuda", self.local_rank if device in (None, "cuda") else
                                       torch.device(device).index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if want_cuda else "gloo")
            self.owns_group = True

    @property
    def group(self):
        """The default process group (None on one process). Looked up, not stored: a reference
        kept here would hold the group alive past ``destroy_process_group`` and gloo's worker
        threads would then be torn down unjoined at exit, aborting the rank."""
        return None if self.world == 1 else tdist.group.WORLD

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any."""
        return self.sum_int(int(flag)) > 0

    def sum_int(self, value: int) -> int:
        """The sum of ``value`` over the ranks (every rank must call it)."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        tdist.all_reduce(t)
        return int(t.item())

    def gather_objects(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def close(self) -> None:
        if self.owns_group:
            tdist.destroy_process_group()
