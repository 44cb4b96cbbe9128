"""lockstep on two real gloo ranks: a failing or short rank stops every rank, none hangs; the
all-reduce of each batch is posted ``depth`` batches ahead and votes are decided at the same batch
on every rank."""

from __future__ import annotations

import pytest
from dist_utils import run_on_ranks

DEPTHS = [0, 1, 2]


def _consume(rank: int, world_size: int, fail_rank: int, fail_at: int, short_rank: int) -> list:
    """For each depth in DEPTHS: ``("ok", batches)`` or ``("error", "Type: message")``."""
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    def batches():
        for step in range(5):
            if rank == fail_rank and step == fail_at:
                raise ValueError(f"bad id in file part-{rank}.parquet at step {step}")
            if rank == short_rank and step == 3:
                return
            yield step

    out = []
    for depth in DEPTHS:
        try:
            out.append(("ok", list(lockstep(batches(), dist.group.WORLD, depth=depth))))
        except Exception as e:  # noqa: BLE001 - the test reads it
            out.append(("error", f"{type(e).__name__}: {e}"))
    return out


def test_all_ranks_finish_together() -> None:
    results = run_on_ranks(_consume, 2, args=(-1, -1, -1))
    assert results == [("ok", [("ok", [0, 1, 2, 3, 4])] * len(DEPTHS))] * 2


def test_a_failing_rank_stops_every_rank_with_its_message() -> None:
    results = run_on_ranks(_consume, 2, args=(1, 2, -1), timeout_s=60)
    for status, by_depth in results:
        assert status == "ok", by_depth
        for depth, (outcome, text) in zip(DEPTHS, by_depth, strict=True):
            assert outcome == "error", depth
            assert text.startswith("RankFailure: input failed on 1 of 2 ranks at step 2:\n"), depth
            assert "rank 1: ValueError: bad id in file part-1.parquet at step 2" in text, depth


def test_ranks_running_out_at_different_steps_fail_loudly() -> None:
    results = run_on_ranks(_consume, 2, args=(-1, -1, 0), timeout_s=60)
    for status, by_depth in results:
        assert status == "ok", by_depth
        for depth, (outcome, text) in zip(DEPTHS, by_depth, strict=True):
            assert outcome == "error", depth
            assert "RankFailure: 1 of 2 ranks ran out of batches at step 3" in text, depth


def _fail_at(rank: int, world_size: int, fail_at: list[int]) -> list[int]:
    """Rank r's loader raises at its batch ``fail_at[r]``; each step takes a little while, so
    the all-reduces posted ahead are in flight when the failure is decided."""
    import time

    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    def batches():
        for step in range(10):
            if step == fail_at[rank]:
                raise ValueError(f"rank {rank} broke at {step}")
            yield step

    taken = []
    for batch in lockstep(batches(), dist.group.WORLD, depth=2):
        taken.append(batch)
        time.sleep(0.02)
    return taken


def test_the_first_failure_is_reported_even_when_another_rank_fails_in_a_batch_read_ahead() -> None:
    # Rank 0 fails at batch 4, rank 1 at batch 3; with depth 2 both failures are fetched before
    # batch 3 is decided, and the report names the batch every rank stops at.
    results = run_on_ranks(_fail_at, 2, args=([4, 3],), timeout_s=60)
    for status, text in results:
        assert status == "error"
        assert "input failed on 1 of 2 ranks at step 3" in text
        assert "rank 1: ValueError: rank 1 broke at 3" in text
        assert "rank 0:" not in text  # its failure at 4 is after the batch everyone stops at


class _VoteAfter:
    """Votes yes once its consumer has taken ``after`` batches (on ``rank`` only); records when
    lockstep asked and decided."""

    def __init__(self, rank: int, voter: int, after: int, taken: list[int], stop: bool = True) -> None:
        self.yes = rank == voter
        self.after, self.taken, self.stop = after, taken, stop
        self.decided: list[tuple[int, int]] = []  # (batches taken, yes count)

    def vote(self) -> bool:
        return self.yes and len(self.taken) >= self.after

    def decide(self, yes: int, world: int) -> bool:
        self.decided.append((len(self.taken), yes))
        return self.stop


def _vote(rank: int, world_size: int) -> list[dict]:
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    out = []
    for depth in DEPTHS:
        fetched: list[int] = []  # the batches the loader has given
        taken: list[int] = []

        def batches(fetched: list[int] = fetched):
            for step in range(20):
                fetched.append(step)
                yield step

        vote = _VoteAfter(rank, voter=1, after=3, taken=taken)
        seen = []
        for batch in lockstep(batches(), dist.group.WORLD, votes=[vote], depth=depth):
            seen.append(len(fetched))
            taken.append(batch)
        out.append({"taken": taken, "decided": vote.decided, "read_ahead": seen})
    return out


def test_votes_are_decided_at_the_same_batch_on_every_rank_depth_batches_after_asked() -> None:
    results = run_on_ranks(_vote, 2, timeout_s=60)
    for status, by_depth in results:
        assert status == "ok", by_depth
        for depth, value in zip(DEPTHS, by_depth, strict=True):
            # Rank 1 votes from the post after its third batch on: that round is batch 3 + depth,
            # so every rank takes batches 0 .. 2 + depth and stops before 3 + depth.
            assert value["taken"] == list(range(3 + depth)), depth
            assert value["decided"] == [(3 + depth, 1)], depth
            # Batch i is yielded once the loader gave batches 0 .. i + depth: their all-reduces
            # are posted while the caller works on batch i.
            assert value["read_ahead"] == [i + 1 + depth for i in range(3 + depth)], depth


def _synchronous_vote(rank: int, world_size: int) -> list[int]:
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    fetched: list[int] = []

    def batches():
        for step in range(4):
            fetched.append(step)
            yield step

    vote = _VoteAfter(rank, voter=-1, after=0, taken=[])
    vote.synchronous = True  # type: ignore[attr-defined]
    return [len(fetched) for _ in lockstep(batches(), dist.group.WORLD, votes=[vote], depth=2)]


def test_a_synchronous_vote_makes_lockstep_blocking() -> None:
    results = run_on_ranks(_synchronous_vote, 2, timeout_s=60)
    assert results == [("ok", [1, 2, 3, 4])] * 2  # no batch read ahead


def _collective_decision(rank: int, world_size: int) -> str:
    """A vote whose decision gathers over the same group (as NonFiniteGuard's does) and raises,
    with two all-reduces in flight; then the group still works."""
    import torch
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    class Gathering(_VoteAfter):
        def decide(self, yes: int, world: int) -> bool:
            names: list[object] = [None] * world
            dist.all_gather_object(names, f"rank {rank} at {len(self.taken)}")
            raise RuntimeError("; ".join(map(str, names)))

    taken: list[int] = []
    vote = Gathering(rank, voter=0, after=2, taken=taken)
    try:
        for batch in lockstep(iter(range(10)), dist.group.WORLD, votes=[vote], depth=2):
            taken.append(batch)
    except RuntimeError as e:
        message = str(e)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # nothing of lockstep's left in flight on the group
    return f"{message} | {int(flag.item())}"


def test_a_vote_that_gathers_and_raises_does_so_on_every_rank_at_the_same_batch() -> None:
    results = run_on_ranks(_collective_decision, 2, timeout_s=60)
    assert results == [("ok", "rank 0 at 4; rank 1 at 4 | 2")] * 2


def _closed_early(rank: int, world_size: int) -> int:
    """Take 3 batches, close the iteration with all-reduces posted ahead, then use the group."""
    import torch
    import torch.distributed as dist
    from towerrec.trainer.distributed import lockstep

    it = lockstep(iter(range(10)), dist.group.WORLD, depth=2)
    for _ in range(3):
        next(it)
    it.close()  # type: ignore[attr-defined]
    again = list(lockstep(iter(range(2)), dist.group.WORLD))
    flag = torch.ones(1)
    dist.all_reduce(flag)
    return len(again) + int(flag.item())


def test_closing_early_leaves_the_group_usable() -> None:
    assert run_on_ranks(_closed_early, 2, timeout_s=60) == [("ok", 4)] * 2


def test_single_process_reraises_the_original_error() -> None:
    from towerrec.trainer.distributed import lockstep

    def batches():
        yield 1
        raise KeyError("x")

    it = lockstep(batches(), None)
    assert next(it) == 1
    with pytest.raises(KeyError):
        next(it)
