"""Shard planning without the hardware: ``towerrec plan``.

Plans where every embedding table lives on a cluster that need not exist (a topology given on the
command line or in a file), with TorchRec's estimators for memory and time, writes a plan the
trainer obeys (``sharding.plan_file``) and a report people can read.

Example::

    from towerrec.trainer.planning.figures import compute_figures
    from towerrec.trainer.planning.planner import plan_config
    from towerrec.trainer.planning.render import write_report
    from towerrec.trainer.planning.topology import parse_topologies

    spec = parse_topologies("2x8xA100-80GB,batch_size=4096")[0]
    result = plan_config(load_config("configs/billion_scale.yaml"), spec)   # fast planner
    figures = compute_figures(result, "billion_scale")
    result.fits, figures.summary.est_step_time_ms
    write_report(result, figures, Path("runs/plan"))   # plan.json, report.md/json, charts

Modules: ``topology`` (the topology spec, presets, TorchRec ``Topology``); the fast planner in
``enumeration`` (the sharding options per table, narrowed, estimated once per shape),
``placement`` (placing options on ranks by TorchRec's partitioner rules; the objective) and
``search`` (start proposals, then local search); ``planner`` (runs the fast or TorchRec's
default planner on the model built on the meta device, for ``towerrec plan`` and, on rank 0,
for the trainer: ``trainer.sharding``); ``figures`` (what a plan means, as
dataclasses) and ``render`` (report.md/json, charts, --compare); ``plan_file`` (plan.json
written and loaded by the trainer); ``torchrec_compat`` (every TorchRec internal the planner
uses). The ``towerrec plan`` command itself is ``towerrec.launch.commands.plan``.
"""
