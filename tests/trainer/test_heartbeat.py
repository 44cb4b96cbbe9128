"""The heartbeat on real gloo ranks: a collective that times out names the rank that went silent."""

from __future__ import annotations

from dist_utils import run_on_ranks


def _time_out(rank: int, world_size: int, silent_rank: int) -> str | None:
    """Rank 0 waits in an all-reduce that rank 1 never joins (2 s timeout) and describes it;
    ``silent_rank`` stops beating first, as a SIGSTOPped process would."""
    import dataclasses
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.heartbeat import Heartbeat, describe_collective_failure, is_collective_failure

    env = dataclasses.replace(init_distributed(), timeout=timedelta(seconds=2))
    group = dist.new_group(backend="gloo", timeout=env.timeout)
    beat = Heartbeat.start(env)
    assert beat is not None
    dist.barrier()
    if rank == silent_rank:
        beat.stop()
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60), wait_for_workers=False)
    if rank == 1:  # stays in the job (no closed connection) until rank 0 has its answer
        store.wait(["test/described"])
        beat.stop()
        return None
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as e:
        assert is_collective_failure(e), str(e)
        described = describe_collective_failure(e, env, beat)
    else:
        raise AssertionError("the all-reduce did not time out")
    finally:
        store.set("test/described", "1")
    beat.stop()
    return described


def test_a_silent_rank_is_named_when_a_collective_times_out() -> None:
    (status, described), _ = run_on_ranks(_time_out, 2, args=(1,))
    assert status == "ok", described
    assert described.startswith("a collective timed out after 2 s (training.collective_timeout_s)")
    assert "rank 1 is not responding (no heartbeat in 3 s" in described


def test_ranks_that_still_beat_are_not_blamed() -> None:
    (status, described), _ = run_on_ranks(_time_out, 2, args=(-1,))
    assert status == "ok", described
    assert "every rank still beats: a connection failed, not a rank" in described
    assert "not responding" not in described
