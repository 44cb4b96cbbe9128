"""Dense networks, stacked against looped: forward + backward + Adam step of PLE, MMoE and DTN.

    python -m benchmarks.experts                    # Census configs (runs/census), batch 2048
    python -m benchmarks.experts --threads 2        # torch threads (default 1)
    python -m benchmarks.experts --quick            # a check; docs untouched
    python -m benchmarks.experts --precision fp32 bf16   # training.precision compared; docs untouched
    python -m benchmarks.experts --adam default fused    # Adam implementations compared; docs untouched

The networks are the trainer's own for the docs/RESULTS.md configs (``benchmarks.quality``'s
models on the Census data config: ``build_train_module`` builds them), fed pre-built random
inputs of the real widths (pooled embeddings and dense features; DTN also the cross codebook's
codewords), both requiring a gradient as the embeddings do in training. Each step: forward,
binary cross-entropy on random labels summed over the tasks, backward, Adam (lr 1e-3, the
dense optimizer of those runs).

Two implementations of each network, same weights, measured in one run taking turns window by
window (so a change of the machine's load hits both alike):

- ``loop``: every stacked module replaced by a Python loop of its single modules
  (``modules.stacked.unstacked``: ``nn.Linear`` / ``MLP`` experts, ``GDCN`` / ``MaskNet`` /
  ``HashedCrossCodebook`` per group), the layout of the networks before they were stacked;
- ``stacked``: the networks as built, one GEMM / ``bmm`` per layer for all experts of a level and
  all modules of a method across DTN's groups.

GFLOP/step counts the matmuls of one step (``torch.utils.flop_counter``); GFLOP/s is that over
the median step time. Both implementations do the same matmul work; what differs is how. The
same run times one large float32 ``torch.mm`` as the machine's matmul peak and prints how long
DTN's matmul work alone would take at that peak, against PLE's whole step. A second
table splits DTN's feature-interaction modules: forward + backward of each method's modules of all
groups, looped and stacked, where most of DTN's step goes.

``--precision fp32 bf16``: instead, the stacked networks at each ``training.precision`` (bf16: the
trainer's autocast, ``modules.multitask.autocast_forward``), each precision on its own copy of
the same initial weights, taking turns the same way; printed only. It reports each network's
bf16 / fp32 step time and the largest absolute difference of the initial logits.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from towerrec.modules.multitask import autocast_forward
from towerrec.modules.stacked import unstacked
from towerrec.trainer.config import DenseOptimizerConfig
from towerrec.trainer.optimizers import dense_optimizer

from benchmarks.report import machine, markdown_table, write_section

MODELS = ("ple", "mmoe", "dtn", "dtn_lite")
# A large float32 GEMM, [batch, GEMM_WIDTH] @ [GEMM_WIDTH, GEMM_WIDTH]: the machine's matmul peak.
GEMM_WIDTH = 1024
IMPLEMENTATIONS = ("loop", "stacked")


@dataclass
class Case:
    """One network and its inputs: ``step()`` runs forward, backward and the optimizer once.
    ``implementation``: ``loop`` or ``stacked``, or the precision of the stacked network."""

    model: str
    implementation: str
    step: Callable[[], None]
    flops: int = 0


def census_networks(data_dir: Path) -> Tuple[Dict[str, nn.Module], int, Optional[int]]:
    """The trainer's networks of the RESULTS configs, the input width and the codewords' width."""
    from towerrec.trainer.config import ExperimentConfig
    from towerrec.trainer.model import build_train_module, cross_shape

    from benchmarks.quality import PRESETS, Run, base_config, run_config

    base = base_config(data_dir)
    tasks = [t["name"] for t in base["data"]["tasks"]]
    networks, in_features, cross_width = {}, 0, None
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            raw = run_config(base, PRESETS["census"], Run(name, tasks, 0, Path(tmp) / name), 1, [])
            config = ExperimentConfig.model_validate(raw)
            torch.manual_seed(0)
            model = build_train_module(config, torch.device("meta")).model  # tables on meta: unused
            networks[name], in_features = model.network, model.in_features
            shape = cross_shape(config.data)
            if shape is not None:
                cross_width = shape.width
    return networks, in_features, cross_width


def quick_networks() -> Tuple[Dict[str, nn.Module], int, Optional[int]]:
    """Small networks of the same types, for a check of the script."""
    from towerrec.modules.dtn import DTN
    from towerrec.modules.interaction import CrossShape
    from towerrec.modules.mmoe import MMoE
    from towerrec.modules.ple import PLE

    shape, tasks = CrossShape(num_pairs=3, num_hashes=2, dim=4), ["a", "b"]
    networks = {
        "ple": PLE(24, tasks, num_levels=2, expert_hidden=[16], tower_hidden=[8]),
        "mmoe": MMoE(24, tasks, num_experts=4, expert_hidden=[16], tower_hidden=[8]),
        "dtn": DTN(24, tasks, methods=["gdcn", "masknet", "memonet"], module_width=8, cross=shape),
        "dtn_lite": DTN(
            24,
            tasks,
            methods=["gdcn", "masknet", "memonet"],
            module_width=8,
            method_options={"gdcn": {"rank": 4}, "masknet": {"num_blocks": 1, "mask_width": 4}},
            cross=shape,
        ),
    }
    return networks, 24, shape.width


def make_case(
    model: str,
    implementation: str,
    network: nn.Module,
    inputs: List[torch.Tensor],
    autocast_dtype: Optional[torch.dtype] = None,
    fused_adam: bool = True,
) -> Case:
    """A training step of ``network`` (``loop``: its unstacked copy) with its own Adam (fused, as
    the trainer's, or torch's default), under autocast in ``autocast_dtype`` as the trainer runs
    it (None: float32)."""
    net = unstacked(network) if implementation == "loop" else network
    net.train()
    optimizer = (
        dense_optimizer(net, DenseOptimizerConfig(type="adam", lr=1e-3))  # the trainer's (fused)
        if fused_adam
        else torch.optim.Adam(net.parameters(), lr=1e-3)  # torch's default for the device
    )
    labels = torch.randint(0, 2, (inputs[0].shape[0],)).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = autocast_forward(net, inputs, autocast_dtype)
        loss = sum(F.binary_cross_entropy_with_logits(v, labels) for v in logits.values())
        loss.backward()
        optimizer.step()
        for x in inputs:
            x.grad = None

    return Case(model, implementation, step)


def make_fi_case(method: str, implementation: str, stack: nn.Module, inputs: List[torch.Tensor]) -> Case:
    """Forward + backward of one DTN method's modules of every group (no optimizer step)."""
    module = unstacked(stack) if implementation == "loop" else stack
    args = inputs if getattr(stack, "reads_cross", False) else inputs[:1]
    upstream: List[torch.Tensor] = []

    def step() -> None:
        out = module(*args)
        if not upstream:
            upstream.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
        (out * upstream[0]).sum().backward()
        for x in args:
            x.grad = None
        module.zero_grad(set_to_none=True)

    return Case(f"dtn.{method}", implementation, step)


def make_gemm_case(batch: int) -> Case:
    """The reference: one large float32 matrix product, the most this machine's matmuls reach."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(batch, GEMM_WIDTH, generator=gen), torch.randn(GEMM_WIDTH, GEMM_WIDTH, generator=gen)
    out = torch.empty(batch, GEMM_WIDTH)
    return Case("gemm", "peak", lambda: torch.mm(a, b, out=out))


def count_flops(case: Case) -> int:
    with FlopCounterMode(display=False) as counter:
        case.step()
    return counter.get_total_flops()


def measure(cases: List[Case], rounds: int, window_seconds: float) -> Dict[Tuple[str, str], List[float]]:
    """Seconds per step of every case, one window per case per round, the cases taking turns."""
    steps = {}
    for case in cases:  # warm-up, then enough steps for a window of about window_seconds
        case.step()
        start = time.perf_counter()
        case.step()
        steps[case.model, case.implementation] = max(1, round(window_seconds / (time.perf_counter() - start)))
    times: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for case in cases:
            key = (case.model, case.implementation)
            start = time.perf_counter()
            for _ in range(steps[key]):
                case.step()
            times[key].append((time.perf_counter() - start) / steps[key])
    return times


def report(cases: List[Case], times: Dict[Tuple[str, str], List[float]], batch: int) -> str:
    median = {key: statistics.median(v) for key, v in times.items()}
    flops = {(c.model, c.implementation): c.flops for c in cases}

    def row(model: str) -> List[str]:
        loop, stacked = median[model, "loop"], median[model, "stacked"]
        return [
            model,
            f"{loop * 1e3:.1f}",
            f"{stacked * 1e3:.1f}",
            f"{loop / stacked:.2f}x",
            f"{batch / loop:,.0f}",
            f"{batch / stacked:,.0f}",
            f"{flops[model, 'stacked'] / 1e9:.2f}",
            f"{flops[model, 'loop'] / loop / 1e9:.0f} / {flops[model, 'stacked'] / stacked / 1e9:.0f}",
        ]

    header = ["network", "loop ms/step", "stacked ms/step", "speed-up", "loop samples/s", "stacked samples/s"]
    header += ["GFLOP/step", "GFLOP/s loop / stacked"]
    modules = sorted({c.model for c in cases if c.model.startswith("dtn.")})
    ratio = {impl: median["dtn", impl] / median["ple", impl] for impl in IMPLEMENTATIONS}
    lite = median["dtn_lite", "stacked"] / median["ple", "stacked"]
    flop_ratio = flops["dtn", "stacked"] / flops["ple", "stacked"]
    share = sum(median[m, "stacked"] for m in modules) / median["dtn", "stacked"]
    peak = flops["gemm", "peak"] / median["gemm", "peak"]  # FLOP/s
    at_peak = flops["dtn", "stacked"] / peak  # seconds: DTN's matmuls alone, at the peak
    bound = at_peak / median["ple", "stacked"]
    return (
        markdown_table(header, [row(m) for m in MODELS])
        + f"\n\nDTN / PLE time per step: loop {ratio['loop']:.1f}x, stacked {ratio['stacked']:.1f}x; "
        f"matmul work {flop_ratio:.0f}x; dtn_lite / PLE stacked {lite:.1f}x.\n\n"
        f"Matmul peak of this machine in the same run: {peak / 1e9:.0f} GFLOP/s (`torch.mm` of "
        f"[{batch}, {GEMM_WIDTH}] @ [{GEMM_WIDTH}, {GEMM_WIDTH}], float32). At that peak DTN's matmul "
        f"work alone would take {at_peak * 1e3:.0f} ms per step, {bound:.1f}x PLE's whole stacked step"
        + (": DTN's time is bound by its arithmetic, not by how it is run.\n\n" if bound > 1 else ".\n\n")
        + "DTN's feature-interaction modules (each method's modules of "
        f"all groups, forward + backward, no optimizer; {share:.0%} of the stacked DTN step):\n\n"
        + markdown_table(header[:4] + header[6:], [row(m)[:4] + row(m)[6:] for m in modules])
        + f"\n\nMedians of {len(next(iter(times.values())))} windows per cell, the cells taking turns; "
        "compare within this run."
    )


def precision_cases(
    networks: Dict[str, nn.Module], inputs: Dict[str, List[torch.Tensor]], precisions: List[str]
) -> Tuple[List[Case], Dict[str, float]]:
    """The stacked networks' steps at each precision (each on its own copy of the weights), and per
    network the largest |logit difference| between the precisions before any step."""
    from towerrec.trainer.model import AUTOCAST_DTYPES

    cases, max_diff = [], {}
    for model, network in networks.items():
        copies = {p: copy.deepcopy(network).train() for p in precisions}
        with torch.no_grad():
            logits = {p: autocast_forward(copies[p], inputs[model], AUTOCAST_DTYPES[p]) for p in precisions}
        max_diff[model] = max(
            (logits[p][t] - logits[precisions[0]][t]).abs().max().item()
            for p in precisions
            for t in logits[p]
        )
        for p in precisions:
            cases.append(make_case(model, p, copies[p], inputs[model], AUTOCAST_DTYPES[p]))
    return cases, max_diff


def precision_report(
    cases: List[Case], times: Dict[Tuple[str, str], List[float]], max_diff: Dict[str, float], batch: int
) -> str:
    precisions = list(dict.fromkeys(c.implementation for c in cases))
    median = {key: statistics.median(v) for key, v in times.items()}
    flops = {c.model: c.flops for c in cases}
    base = precisions[0]

    def row(model: str) -> List[str]:
        cells = [model] + [f"{median[model, p] * 1e3:.1f}" for p in precisions]
        cells += [f"{median[model, p] / median[model, base]:.2f}" for p in precisions[1:]]
        cells += [f"{batch / median[model, p]:,.0f}" for p in precisions]
        return cells + [f"{max_diff[model]:.2e}", f"{flops[model] / 1e9:.2f}"]

    header = ["network"] + [f"{p} ms/step" for p in precisions]
    header += [f"{p} / {base} time" for p in precisions[1:]] + [f"{p} samples/s" for p in precisions]
    header += ["max abs initial logit diff", "GFLOP/step"]
    models = list(dict.fromkeys(c.model for c in cases))
    dtn_ple = ", ".join(f"{p} {median['dtn', p] / median['ple', p]:.1f}x" for p in precisions)
    return (
        markdown_table(header, [row(m) for m in models])
        + f"\n\nDTN / PLE time per step: {dtn_ple}."
        + f"\n\nMedians of {len(next(iter(times.values())))} windows per cell, the cells taking turns; "
        "compare within this run."
    )


def compare_precisions(
    args: argparse.Namespace,
    networks: Dict[str, nn.Module],
    inputs: Dict[str, List[torch.Tensor]],
    batch: int,
) -> None:
    """``--precision``: the stacked networks' steps at each precision, printed (docs untouched)."""
    cases, max_diff = precision_cases(networks, inputs, list(dict.fromkeys(args.precision)))
    for case in cases:
        case.flops = count_flops(case)
    times = measure(cases, 1 if args.quick else args.rounds, 0.05 if args.quick else args.window)
    print(
        f"Dense network only: forward + backward + Adam per step, batch {batch}, {args.threads} torch "
        f"thread(s), stacked networks, {'small (--quick)' if args.quick else 'the Census configs'}; "
        f"{machine()}.\n\n" + precision_report(cases, times, max_diff, batch)
    )


def compare_adams(
    args: argparse.Namespace,
    networks: Dict[str, nn.Module],
    inputs: Dict[str, List[torch.Tensor]],
    batch: int,
) -> None:
    """``--adam``: the stacked networks' steps with each Adam implementation (each on its own copy
    of the weights), printed (docs untouched)."""
    kinds = list(dict.fromkeys(args.adam))
    cases = [
        make_case(model, kind, copy.deepcopy(network), inputs[model], fused_adam=kind == "fused")
        for model, network in networks.items()
        for kind in kinds
    ]
    times = measure(cases, 1 if args.quick else args.rounds, 0.05 if args.quick else args.window)
    median = {key: statistics.median(v) for key, v in times.items()}
    rows = [
        [model]
        + [f"{median[model, k] * 1e3:.1f}" for k in kinds]
        + [f"{median[model, k] / median[model, kinds[0]]:.2f}" for k in kinds[1:]]
        for model in networks
    ]
    header = ["network"] + [f"{k} Adam ms/step" for k in kinds] + [f"{k} / {kinds[0]}" for k in kinds[1:]]
    print(
        f"Dense network only: forward + backward + Adam per step, batch {batch}, {args.threads} torch "
        f"thread(s), stacked networks; `default`: torch's Adam for the device (a loop of ops per "
        f"parameter on CPU), `fused`: its fused kernel (the trainer's); {machine()}.\n\n"
        + markdown_table(header, rows)
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path("runs/census"), help="`towerrec data census` output"
    )
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="windows per cell")
    parser.add_argument("--window", type=float, default=0.5, help="seconds per window (at least one step)")
    parser.add_argument("--quick", action="store_true", help="small networks, one round; docs untouched")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        help="compare the stacked networks at these training.precision values instead; docs untouched",
    )
    parser.add_argument(
        "--adam",
        nargs="+",
        choices=["default", "fused"],
        help="compare the stacked networks' steps with these Adam implementations instead; docs untouched",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    networks, in_features, cross_width = quick_networks() if args.quick else census_networks(args.data)
    batch = 64 if args.quick else args.batch
    gen = torch.Generator().manual_seed(0)
    inputs: Dict[str, List[torch.Tensor]] = {}
    for model in MODELS:
        inputs[model] = [torch.randn(batch, in_features, generator=gen).requires_grad_()]
        if model.startswith("dtn"):
            assert cross_width is not None, "the DTN config reads the cross codebook"
            inputs[model].append(torch.randn(batch, cross_width, generator=gen).requires_grad_())
    if args.precision:
        compare_precisions(args, networks, inputs, batch)
        return
    if args.adam:
        compare_adams(args, networks, inputs, batch)
        return
    cases = []
    for model in MODELS:
        for implementation in IMPLEMENTATIONS:
            cases.append(make_case(model, implementation, networks[model], inputs[model]))
        if model == "dtn":
            for method, stack in networks[model].interactions.items():
                for implementation in IMPLEMENTATIONS:
                    cases.append(make_fi_case(method, implementation, stack, inputs[model]))
    cases.append(make_gemm_case(batch))
    for case in cases:
        case.flops = count_flops(case)
    times = measure(cases, 1 if args.quick else args.rounds, 0.05 if args.quick else args.window)
    configs = "small networks (--quick)" if args.quick else "the Census configs of docs/RESULTS.md"
    body = (
        f"Dense network only (no embeddings, no loader): forward + backward + Adam per step, batch "
        f"{batch}, {args.threads} torch thread(s), {configs}. `loop` runs each stack's members one by "
        "one (`modules.stacked.unstacked`), `stacked` one kernel per layer for all of them.\n\n"
        + report(cases, times, batch)
    )
    if args.quick:
        print(body)
    else:
        write_section("experts", "Stacked experts: dense networks, looped vs stacked", body)


if __name__ == "__main__":
    main()
