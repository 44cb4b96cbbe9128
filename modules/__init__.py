"""Dense multi-task models for towerrec: building blocks, PLE/CGC, the multi-task loss.

Submodules (import them directly; this package stays import-light so ``modules.config`` does
not pull in TorchRec):

- ``modules.mlp.MLP``, ``modules.gate.Gate``, ``modules.tower.Tower``: common parts.
- ``modules.stacked`` (and ``modules.mlp.StackedMLP``): n same-shaped experts run as one kernel per
  layer; MMoE's and PLE's experts and DTN's feature-interaction modules are stacked.
- ``modules.ple.PLE`` / ``modules.ple.CGC``: Progressive Layered Extraction.
- ``modules.mmoe.MMoE``, ``modules.shared_bottom.SharedBottom``, ``modules.single_task.SingleTask``:
  the papers' baselines.
- ``modules.loss.MultiTaskLoss`` / ``TaskLossSpec``: weighted BCE with sample spaces.
- ``modules.multitask.MultiTaskModel``: embeddings + dense features -> network.
- ``modules.builders.build_network``: config -> network.
"""
