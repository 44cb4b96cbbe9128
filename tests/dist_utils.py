"""Run a function on N real gloo ranks (separate processes on 127.0.0.1) and collect the results.

Example::

    results = run_on_ranks(my_fn, world_size=2, args=(tmp_path,))   # my_fn(rank, world_size, *args)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 120
) -> list[tuple[str, Any]]:
    """Returns ``[(status, value_or_error_text)]`` by rank; fails the test if a rank hangs."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, status, value = queue.get(timeout=1)
                results[rank] = (status, value)
                continue
            except queue_module.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                raise AssertionError(
                    f"ranks {dead} died without a result (exit codes {[procs[r].exitcode for r in dead]})"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ranks {sorted(set(range(world_size)) - set(results))} hung for {timeout_s} s"
                )
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
