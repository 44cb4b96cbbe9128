"""Shard planning without the hardware: ``towerrec plan``.

Plans where every embedding table lives on a cluster that need not exist (a topology given on the
command line or in a file), with TorchRec's estimators for memory and time, writes a plan the
trainer obeys (``sharding.plan_file``) and a report people can read.

Example::

    from towerrec.trainer.planning.planner import plan_config
    from towerrec.trainer.planning.report import compute_figures, write_report
    from towerrec.trainer.planning.topology import parse_topologies

    spec = parse_topologies("2x8xA100-80GB,batch_size=4096")[0]
    result = plan_config(load_config("configs/billion_scale.yaml"), spec)   # fast planner
    figures = compute_figures(result, "billion_scale")
    result.fits, figures["summary"]["est_step_time_ms"]
    write_report(result, figures, Path("runs/plan"))   # plan.json, report.md/json, charts

Modules: ``topology`` (the topology spec, presets, TorchRec ``Topology``), ``fast`` (the fast
planner: narrowed options, shared estimates, partition and local search), ``planner`` (runs the
fast or TorchRec's default planner on the model built on the meta device), ``report`` (figures,
report.md, charts, --compare), ``plan_file`` (plan.json written and loaded by the trainer),
``command`` (the ``towerrec plan`` handler).
"""
