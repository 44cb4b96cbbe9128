"""Entry point run by torch.distributed.run on every rank.

Example::

    python -m torch.distributed.run --nproc_per_node 2 -m towerrec.trainer.main \
        --config configs/demo.yaml --set training.batch_size=4096

Exit status: 0 done; 1 a failure, named on stderr (bad data, a checkpoint, a non-finite loss);
2 a bad config; 143 stopped by SIGTERM after saving (``trainer.preemption``): retry it, it resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist
from towerrec.data.parquet import DataError, end_workers
from towerrec.trainer.checkpoint import CheckpointError
from towerrec.trainer.config import ConfigError, add_config_arguments, load_config, validate_data
from towerrec.trainer.distributed import (
    RankFailure,
    describe_error,
    init_distributed,
    set_threads,
    size_threads,
)
from towerrec.trainer.heartbeat import Heartbeat, describe_collective_failure, is_collective_failure
from towerrec.trainer.planning.plan_file import PlanFileError
from towerrec.trainer.planning.planner import PlanningError
from towerrec.trainer.preemption import PREEMPTED_EXIT, Preempted
from towerrec.trainer.quiet import silence_known_warnings
from towerrec.trainer.train import train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="towerrec.trainer.main", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    silence_known_warnings()
    rank = os.environ.get("RANK", "0")
    # Our loggers at INFO; libraries (fbgemm logs every table at INFO on the root logger) at WARNING.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("towerrec").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        validate_data(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = init_distributed(config.training.collective_timeout_s)
    # Before any model is built: torch sizes its pools at first use; torchrun's OMP_NUM_THREADS=1
    # (several ranks) or none (one rank: every core, beside the loader's workers) is replaced.
    training = config.training
    set_threads(size_threads(training.threads, env.local_world_size, training.num_workers), env.is_main)
    beat = Heartbeat.start(env)  # names the rank that stops responding when a collective fails
    try:
        train(config, env)
    except (DataError, RankFailure, CheckpointError, PlanningError, PlanFileError) as e:
        why = describe_collective_failure(e, env, beat) if is_collective_failure(e) else describe_error(e)
        print(f"[rank {env.rank}] error: {why}", file=sys.stderr)
        return 1
    except Preempted as e:  # trainer.preemption: saved; the scheduler retries, the run resumes
        print(f"[rank {env.rank}] preempted: {e}; exit status {PREEMPTED_EXIT}", file=sys.stderr)
        return PREEMPTED_EXIT
    except RuntimeError as e:  # a collective failed or timed out: which rank is not responding
        if not is_collective_failure(e):
            raise
        print(f"[rank {env.rank}] error: {describe_collective_failure(e, env, beat)}", file=sys.stderr)
        return 1
    finally:
        if beat is not None:
            beat.stop()
        end_workers()  # before the group goes: they hold no collective, but may block exit
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
