"""lockstep on two real gloo ranks: a failing or short rank stops every rank, none hangs."""

from __future__ import annotations

from dist_utils import run_on_ranks


def _consume(rank: int, world_size: int, fail_rank: int, fail_at: int, short_rank: int) -> list[int]:
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    def batches():
        for step in range(5):
            if rank == fail_rank and step == fail_at:
                raise ValueError(f"bad id in file part-{rank}.parquet at step {step}")
            if rank == short_rank and step == 3:
                return
            yield step

    return list(lockstep(batches(), dist.group.WORLD))


def test_all_ranks_finish_together() -> None:
    results = run_on_ranks(_consume, 2, args=(-1, -1, -1))
    assert results == [("ok", [0, 1, 2, 3, 4]), ("ok", [0, 1, 2, 3, 4])]


def test_a_failing_rank_stops_every_rank_with_its_message() -> None:
    results = run_on_ranks(_consume, 2, args=(1, 2, -1))
    for status, text in results:
        assert status == "error"
        assert "RankFailure" in text
        assert "input failed on 1 of 2 ranks at step 2" in text
        assert "rank 1: ValueError: bad id in file part-1.parquet at step 2" in text


def test_ranks_running_out_at_different_steps_fail_loudly() -> None:
    results = run_on_ranks(_consume, 2, args=(-1, -1, 0))
    for status, text in results:
        assert status == "error"
        assert "1 of 2 ranks ran out of batches at step 3" in text


def test_single_process_reraises_the_original_error() -> None:
    import pytest
    from towerrec.trainer.distributed import lockstep

    def batches():
        yield 1
        raise KeyError("x")

    it = lockstep(batches(), None)
    assert next(it) == 1
    with pytest.raises(KeyError):
        next(it)
