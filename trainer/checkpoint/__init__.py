"""Sharded checkpoints: atomic saves, exact resume, resharding to another world size or plan.

Example::

    manager = CheckpointManager(config, env, model, dense_opt, table_opt, plan, train_set)
    point = manager.resume()              # None: a fresh run; else where to continue
    manager.maybe_save(step, epoch, batch, eval_metrics)   # every checkpoint.interval steps
    load_model_state("runs/demo", None, build_train_module(config, torch.device("cpu")))

Modules: ``layout`` (folders, ``latest``, publishing, retention, leftovers), ``meta``
(meta.json, typed), ``integrity`` (checks before loading; one-process load), ``sparse_state``
(the tables' optimizer state and its resharding), ``chunks`` (tables saved and read in row
chunks, never as a second copy), ``train_state`` (RNG states, data position, where a resumed run
continues), ``manager`` (:class:`CheckpointManager`).

Layout (a contract: ``trainer.export`` reads it)::

    RUN_DIR/checkpoints/step-00000040/   one torch.distributed.checkpoint (DCP) directory:
        .metadata, __<rank>_0.distcp      DCP's index and every rank's data
        meta.json                         rank 0: step, epoch, world size, config, plan, tables
    RUN_DIR/checkpoints/latest            "step-00000040": the newest complete checkpoint
    RUN_DIR/checkpoints/best              "step-00000032": early stopping's best (never pruned)

Entries of the DCP state dict:

* ``model``: ``TrainModule.state_dict()`` keys, exactly those of an unsharded
  ``build_train_module`` (DistributedModelParallel's state dict has them; sharded tables are
  ShardedTensors, data-parallel tables and the dense network plain tensors). DCP reshards on load.
  Every tensor above ``checkpoint.chunk_mb`` (8 MB) is stored as row chunks of at most that size
  (``chunks``); checkpoints written before, one item per shard, load the same way.
* ``optim.dense``: the dense optimizer's state by parameter key.
* ``optim.sparse.<table>.<state>``: the tables' optimizer state under fbgemm's names, whatever the
  placement (TorchRec issue 2394: a data-parallel table's torch optimizer names it otherwise);
  row-wise state is resharded across column shards as ``sparse_state`` describes.
* ``progress``: step, epoch, batch in the epoch (JSON); ``ranks.<r>``: rank r's RNG states
  (torch, numpy, python) and data position, per DataLoader worker (JSON).

Atomic save: every rank writes into ``step-XXXXXXXX.tmp``; after DCP's collective finish (all
data and ``.metadata`` written) rank 0 writes meta.json, renames the directory, then replaces
``latest`` (``towerrec.data.files.atomic_output``: write, fsync, ``os.replace``); retention
deletes the oldest but the one ``best`` names (written after ``latest`` when
``training.early_stopping`` saves a new best step; its state is in meta.json, and a resumed
run repairs ``best`` if a kill came between the two). A process killed anywhere before the last
rename leaves ``latest`` and its checkpoint as they were; leftovers (``.tmp`` directories, a
renamed directory ``latest`` never pointed to) are deleted when the run resumes. A failed save
raises on every rank, removes its ``.tmp`` directory and changes nothing that was complete
(``checkpoint.on_save_error: continue``: the manager warns and the run goes on). Retention runs
only after ``latest`` names the new checkpoint.

Integrity: meta.json's ``files`` holds every DCP file's size and CRC32 (``checkpoint.checksums``),
computed by each rank for the files it wrote; before loading, every file is checked for presence and
size, and each rank checks the checksums of every world_size-th file. A damaged ``latest`` is
renamed ``step-X.damaged`` and ``latest`` pointed to the previous complete checkpoint, with a
warning naming the file (``checkpoint.resume_fallback``; false: the error stops the run).

Resume policy (``checkpoint.resume``): ``auto`` continues from ``latest`` if there is one,
``required`` fails without one, ``never`` refuses a run directory that holds checkpoints. Before
loading, rank 0 checks the files (every ``.distcp`` file as long as ``.metadata`` says), the
tables (names, rows, dims) against the config and every model tensor's shape, and raises one
:class:`CheckpointError` listing all differences. Where the data continues: ``train_state``.

meta.json also holds the learning-rate schedule's state (``training.lr_schedule``: epoch and each
scheduler's step, resumed exactly) and early stopping's (best value and step, evaluations since).
Not saved, because the config defines them: base learning rates and optimizer hyper-parameters (a
changed config value applies from the resumed step, with a warning listing the config differences),
and the step count of the data-parallel tables' torch optimizers (fbgemm keeps none; it is set to
the global step).
"""

from towerrec.trainer.checkpoint.integrity import load_model_state, verify_files
from towerrec.trainer.checkpoint.layout import (
    CheckpointError,
    best_checkpoint,
    checkpoint_root,
    choose_checkpoint,
    complete_steps,
    describe_choice,
    find_checkpoint,
    latest_checkpoint,
    step_dir_name,
)
from towerrec.trainer.checkpoint.manager import CheckpointManager
from towerrec.trainer.checkpoint.meta import CheckpointMeta, read_meta
from towerrec.trainer.checkpoint.train_state import ResumePoint

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMeta",
    "ResumePoint",
    "best_checkpoint",
    "checkpoint_root",
    "choose_checkpoint",
    "complete_steps",
    "describe_choice",
    "find_checkpoint",
    "latest_checkpoint",
    "load_model_state",
    "read_meta",
    "step_dir_name",
    "verify_files",
]
