"""Export: the artifact runs alone, carries its schema, matches the trained model within the
stated tolerances, and a failed check writes nothing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from dist_utils import run_on_ranks
from export_helpers import exported, trained_run, write_checkpoint
from towerrec.data.parquet import ParquetDataset
from towerrec.data.synth import synthetic_config
from towerrec.trainer import export
from towerrec.trainer.config import ExperimentConfig
from towerrec.trainer.export import TOLERANCES, ExportCheckError, export_model
from towerrec.trainer.model import build_train_module
from towerrec.trainer.predict import load_artifact


@pytest.mark.parametrize("quantize", ["int8", "fp16", "none"])
def test_artifact_matches_trained_model_within_tolerance(synth_data: Path, quantize: str) -> None:
    _, report = exported(synth_data, quantize)
    assert report.passed and report.rows == 4000
    # The check computes AUC with the trainer's TaskMetrics: it reproduces the trainer's eval AUC.
    trained = json.loads((trained_run(synth_data) / "eval_metrics.json").read_text())
    for name, task in report.tasks.items():
        assert task.auc_trained == pytest.approx(trained[name]["auc"], abs=1e-4)
    assert report.tasks["click"].auc_trained > 0.6
    clicks = pc.sum(pq.read_table(synth_data / "eval", columns=["click"])["click"]).as_py()
    assert report.tasks["click"].examples == 4000 and report.tasks["conversion"].examples == clicks
    tol = TOLERANCES[quantize]
    for task in report.tasks.values():
        assert task.max_dp <= tol.max_dp and abs(task.dauc) <= tol.max_dauc
    if quantize == "none":  # fp32 tables in the inference kernel: the same numbers
        assert all(t.max_dp < 1e-6 for t in report.tasks.values())
    else:  # quantized rows do move probabilities, but far below the tolerance
        assert all(t.max_dp < tol.max_dp / 3 for t in report.tasks.values())
        assert any(t.max_dp > 0 for t in report.tasks.values())


def test_artifact_carries_its_schema(synth_data: Path) -> None:
    path, _ = exported(synth_data, "int8")
    schema = load_artifact(path).schema
    features = schema["data"]["sparse_features"]
    assert [f["name"] for f in features][-1] == "user_history" and features[-1]["multi_hot"]
    assert {f["id_mode"] for f in features} == {"check"}
    assert {t["name"]: t["num_embeddings"] for t in schema["data"]["tables"]}["user"] == 100_000
    assert schema["data"]["dense_features"] == ["price", "user_age", "item_ctr", "hour_sin"]
    assert [t["name"] for t in schema["data"]["tasks"]] == ["click", "conversion"]
    assert "train" not in schema["data"] and "eval" not in schema["data"]
    assert schema["quantization"] == "int8"
    assert schema["source"]["step"] == 60
    assert schema["versions"]["towerrec"] and schema["versions"]["torch"] == torch.__version__


FRESH_PROCESS = """
import json, sys
import torch, fbgemm_gpu
extra = {"towerrec_schema.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
schema = json.loads(extra["towerrec_schema.json"])
inputs = torch.load(sys.argv[2])
with torch.inference_mode():
    out = model(inputs["values"], inputs["lengths"], inputs["dense"])
torch.save(out, sys.argv[3])
ours = sorted(m for m in sys.modules if m.split(".")[0] == "towerrec")
print(json.dumps({"tasks": [t["name"] for t in schema["data"]["tasks"]], "ours": ours}))
"""


def test_artifact_runs_in_a_fresh_process_with_torch_and_fbgemm_only(
    synth_data: Path, tmp_path: Path
) -> None:
    path, _ = exported(synth_data, "int8")
    # Two rows by hand: ids as table rows, the history multi-hot (3 ids, then none).
    lengths = torch.tensor([1, 1] * 5 + [3, 0], dtype=torch.int32)
    values = torch.tensor([5, 7, 11, 13, 2, 3, 40, 41, 1, 2, 100, 200, 300])
    dense = torch.tensor([[0.1, -0.2, 0.3, 0.0], [1.0, 0.5, -1.0, 0.7]])
    torch.save({"values": values, "lengths": lengths, "dense": dense}, tmp_path / "in.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,  # not the repository: nothing of towerrec on the path but the installed package
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"tasks": ["click", "conversion"], "ours": []}
    out = torch.load(tmp_path / "out.pt")
    expected = load_artifact(path).module(values, lengths, dense)
    for task in ("click", "conversion"):
        assert out[task].shape == (2,) and ((out[task] > 0) & (out[task] < 1)).all()
        torch.testing.assert_close(out[task], expected[task])


def test_failed_check_raises_and_keeps_the_previous_file(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = trained_run(synth_data)
    out = tmp_path / "model.pt"
    out.write_bytes(b"previous artifact")
    build = export.build_inference_model

    def corrupted(*args, **kwargs):  # one tower bias off by 0.5: every click probability moves
        model = build(*args, **kwargs)
        model.network.towers["click"].logit.bias.data += 0.5
        return model

    monkeypatch.setattr(export, "build_inference_model", corrupted)
    with pytest.raises(ExportCheckError) as failure:
        export_model(run_dir, out, quantize="int8")
    report = failure.value.report
    assert not report.passed
    assert report.tasks["click"].max_dp > TOLERANCES["int8"].max_dp
    assert report.tasks["conversion"].max_dp <= TOLERANCES["int8"].max_dp
    assert "click" in str(failure.value) and "FAIL" in str(failure.value)
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


@pytest.mark.parametrize("quantize", ["int8", "fp16", "none"])
def test_table_by_table_quantization_is_torchrecs_bit_for_bit(synth_data: Path, quantize: str) -> None:
    """Export fills the quantized tables block by block (here 1,000 rows at a time; one table
    fp16, one mean-pooled): the same bytes and probabilities as TorchRec's
    ``quantize_inference_model`` of the whole float model."""
    from torchrec.inference.modules import quantize_inference_model

    raw = synthetic_config(str(synth_data), run_dir="unused")
    raw["data"]["tables"][1].update(data_type="fp16", pooling="mean")  # item
    config = ExperimentConfig.model_validate(raw)
    torch.manual_seed(3)
    module = build_train_module(config, torch.device("cpu")).eval()
    weights = {name: table.weight.detach() for name, table in module.model.ebc.embedding_bags.items()}
    for weight in weights.values():
        weight.normal_()

    def blocks(name: str):
        for first in range(0, len(weights[name]), 1000):
            yield first, weights[name][first : first + 1000]

    ours = export.build_inference_model(module, config, quantize, blocks)
    whole = export.inference_model(copy.deepcopy(module.model.ebc), module, config)
    torchrecs = quantize_inference_model(whole, quantization_dtype=export.QUANTIZATIONS[quantize])
    ours_state, torchrec_state = ours.state_dict(), torchrecs.state_dict()
    assert ours_state.keys() == torchrec_state.keys()
    assert all(torch.equal(ours_state[k], torchrec_state[k]) for k in ours_state)
    files = sorted(str(path) for path in (synth_data / "eval").glob("*.parquet"))
    batch = next(iter(ParquetDataset(files, config.data, batch_size=512)))
    inputs = (batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    with torch.inference_mode():
        for task, probability in ours(*inputs).items():
            assert torch.equal(probability, torchrecs(*inputs)[task])


def test_eval_mode_pooling_and_hashing_survive_export(synth_data: Path, tmp_path: Path) -> None:
    """BatchNorm and dropout in eval mode, mean pooling next to sum pooling (the quantized
    collection groups tables by pooling), hashed ids, no dense features: an unquantized export
    gives the float model's probabilities."""
    raw = synthetic_config(str(synth_data), run_dir=str(tmp_path / "run"))
    raw["data"]["tables"][1]["pooling"] = "mean"  # item: user_history and item_id
    raw["data"]["sparse_features"][0]["id_mode"] = "hash"  # user_id
    raw["data"]["dense_features"] = []
    raw["model"]["mlp"] = {"norm": "batch", "dropout": 0.3}
    config = ExperimentConfig.model_validate(raw)
    torch.manual_seed(1)
    module = build_train_module(config, torch.device("cpu"))
    for name, buffer in module.named_buffers():  # running stats that are not the identity
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    with torch.no_grad():
        for table in module.model.ebc.embedding_bags.values():
            table.weight.normal_()
    write_checkpoint(tmp_path / "run", config, module, step=3)
    report = export_model(tmp_path / "run", tmp_path / "m.pt", quantize="none", check_rows=1000)
    assert report is not None and report.rows == 1000
    assert all(t.max_dp < 1e-5 for t in report.tasks.values())
    assert load_artifact(tmp_path / "m.pt").schema["data"]["sparse_features"][0]["id_mode"] == "hash"


def test_dtn_with_cross_codebook_exports_as_the_float_model(synth_data: Path, tmp_path: Path) -> None:
    """The codebook table and its hashed pair features go through export: the artifact takes the
    cross ids after the sparse features (schema ``data.cross``) and matches the float model."""
    raw = synthetic_config(str(synth_data), run_dir=str(tmp_path / "run"))
    raw["data"]["tables"].append({"name": "codebook", "num_embeddings": 3000, "embedding_dim": 4})
    raw["data"]["cross"] = {"table": "codebook", "fields": ["user_id", "item_id", "device"]}
    raw["model"] = {
        "type": "dtn",
        "methods": ["gdcn", "memonet"],
        "module_width": 8,
        "tower_hidden": [8],
        "dependencies": {"conversion": "click"},
    }
    config = ExperimentConfig.model_validate(raw)
    torch.manual_seed(2)
    module = build_train_module(config, torch.device("cpu"))
    with torch.no_grad():
        for table in module.model.ebc.embedding_bags.values():
            table.weight.normal_()
    write_checkpoint(tmp_path / "run", config, module, step=3)
    report = export_model(tmp_path / "run", tmp_path / "m.pt", quantize="none", check_rows=1000)
    assert report is not None and all(t.max_dp < 1e-5 for t in report.tasks.values())
    schema = load_artifact(tmp_path / "m.pt").schema["data"]
    assert schema["cross"] == {"table": "codebook", "fields": raw["data"]["cross"]["fields"], "num_hashes": 2}


def _train_relative(rank: int, world_size: int, overrides: list[str]) -> int:
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    trainer = Trainer(load_config("config.yaml", overrides), init_distributed())
    trainer.fit()
    return trainer.step


def test_run_files_and_artifact_carry_no_path_of_the_machine(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given relative paths, what a run writes (config, plan, metrics, checkpoint meta, importance),
    what evaluation reports and what an artifact's schema holds name them as given: nothing of
    this machine's directory tree, so run directories and docs can move and be committed."""
    from towerrec.trainer.evaluate import RunEvaluator, evaluation_report

    monkeypatch.chdir(tmp_path)  # the spawned rank starts here too
    (tmp_path / "data").symlink_to(synth_data)
    (tmp_path / "config.yaml").write_text((synth_data / "config.yaml").read_text())
    overrides = [
        "run_dir=run",
        "data.train=data/train",
        "data.eval=data/eval/*.parquet",
        "training.batch_size=512",
        "training.max_steps=4",
        "training.num_workers=0",
        "importance.enabled=true",
    ]
    [(status, step)] = run_on_ranks(_train_relative, 1, args=(overrides,))
    assert status == "ok", step
    export_model("run", "model.pt", quantize="none", check_rows=512)
    evaluator = RunEvaluator("run")
    written = {
        "model.pt schema": json.dumps(load_artifact("model.pt").schema),
        "evaluate report": json.dumps(evaluation_report(evaluator, ["data/eval/part-00000.parquet"], {})),
    }
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and (path.suffix in {".json", ".jsonl", ".yaml", ".md"} or path.name == "latest"):
            written[str(path.relative_to(tmp_path))] = path.read_text()
    assert {"run/config.yaml", "run/metrics.jsonl", "run/importance/importance.json"} <= set(written)
    assert any(name.endswith("meta.json") for name in written)
    machine = [str(tmp_path), str(tmp_path.resolve()), str(synth_data), str(synth_data.resolve())]
    for name, text in written.items():
        assert not [m for m in machine if m in text], name
    assert json.loads(written["run/importance/importance.json"])["run_dir"] == "run"
    assert load_artifact("model.pt").schema["source"]["run_dir"] == "run"
    assert evaluator.source()["run_dir"] == "run"
