"""One harness for the tests that run on several processes: a gloo process group on the CPU.

    results = run_on_ranks(worker, tmp_path, arg1, arg2)   # [rank 0's return, rank 1's, ...]

``worker(rank, world_size, *args)`` runs in each of ``world_size`` spawned processes, inside
an initialised process group, and returns something ``torch.save`` can write; the parent gets
each rank's return value.

- The rendezvous is a FileStore in ``tmp_path``, not a TCP port: a port chosen before spawning
  can be taken by the time the workers bind it.
- Results come back through files in ``tmp_path``.
- Every rank reaches a barrier before any tears the group down, so none exits while another
  still runs a collective with it.
- A rank that succeeded leaves with ``os._exit(0)``, skipping the interpreter's finalisation.
  DDP's reducer keeps the process group alive from C++ after ``destroy_process_group()``
  (torch 2.13: 12 references, none from Python, and gloo's three threads still running after
  ``gc.collect()``; without DDP the last reference goes and the threads stop). Those threads
  would otherwise be torn down by finalisation, in whatever order it runs: the class of crash
  in which a rank dies with SIGABRT, "terminate called without an active exception".
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(worker, tmp_path, *args, world_size: int = 2) -> list:
    """Runs ``worker(rank, world_size, *args)`` on ``world_size`` processes; returns their
    results in rank order. A worker's exception fails the call with its traceback."""
    workdir = str(tmp_path)
    mp.spawn(_rank_main, args=(world_size, workdir, worker, args), nprocs=world_size, join=True)
    return [
        torch.load(os.path.join(workdir, f"rank{rank}.pt"), weights_only=False)
        for rank in range(world_size)
    ]


def _rank_main(rank, world_size, workdir, worker, args):
    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see the module docstring: no finalisation with gloo's threads alive


def fsdp2():
    """``(fully_shard, MixedPrecisionPolicy)`` from where this torch keeps them."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy
