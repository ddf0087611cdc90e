"""A config's grid of runs in the plan: each run's parameters beside the paper's count, and
the grid's projected GPU hours at the rates benchmarks/NOTES.md measured for the nearest setup
(docs/design.md: The paper's experiments)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cascade_clip.plan.measured import FACT_KEYS, FACT_VALUES, MEASURED, Measured, run_facts, train_batch_plan
from cascade_clip.plan.sizes import fmt_duration, split_facts

if TYPE_CHECKING:
    from cascade_clip.plan import Plan


def parameter_lines(plan: Plan) -> list[str]:
    """Per run: trainable parameters, ours and as the paper counts them (its "Params"), and
    the paper's own figure where the run reproduces a row that gives one (Table 7)."""
    from cascade_clip.paper import paper_row, row_paper_ids

    ablations = plan.cfg.extra.get("ablations") or {}
    lines = ["Parameters (trainable; \"as the paper counts\": the release's count, its decoders' unused "
             "self-attention, norm1 and last-layer value path and FFN included)"]
    for run, ck in plan.checkpoints.items():
        papers = [paper_row(i) for i in row_paper_ids(ablations.get(run))]
        given = [f"paper {p.id}: {p.params_m} M" for p in papers if p.params_m is not None]
        lines.append(f"  {run:<22} {ck.trainable_params:>12,} ours, {ck.release_params:>12,} as the paper "
                     f"counts ({ck.release_params / 1e6:.1f} M)" + (f"; {'; '.join(given)}" if given else ""))
    return lines


def nearest_measured(stage: str, facts: dict) -> tuple[Measured | None, list[str]]:
    """The GPU measurement of `stage` on the same path (vpt or cache) and what differs from it."""
    for m in MEASURED:
        if m.stage != stage or m.requires.get("device") != "gpu":
            continue
        if "path" in m.requires and m.requires["path"] != facts["path"]:
            continue
        diffs = [f"{FACT_KEYS[k]} {FACT_VALUES.get((k, facts.get(k)), facts.get(k))} "
                 f"(measured {FACT_VALUES.get((k, v), v)})"
                 for k, v in m.requires.items() if facts.get(k) != v]
        return m, diffs
    return None, []


def gpu_hour_lines(plan: Plan) -> list[str]:
    """The grid's GPU hours: every training run (x workflow.seeds) and its evaluation, each at
    the rate measured for the nearest setup, assuming every GPU of a job keeps the rate one
    process had. A projection, not a measurement: what differs from the measured setup is
    listed per run (the real configs train in fp32, the rates were measured in bf16: a lower
    bound)."""
    cfg, wf = plan.cfg, plan.workflow
    gpus, nodes, eval_gpus = int(wf["train_gpus"]), int(wf["train_nodes"]), int(wf["eval_gpus"])
    if not gpus:
        return ["GPU hours: none (workflow.train_gpus 0: training runs on the CPU)"]
    seeds = len(wf.get("seeds") or [None])
    head = (f"GPU hours, projected ({len(plan.run_cfgs)} runs x {seeds} seed(s); each at the rate NOTES.md "
            f"measured for the nearest setup, {gpus * nodes} GPUs a training job keeping one process's rate)")
    lines, total_train, serial = [head], 0.0, 0.0
    for run, rcfg in plan.run_cfgs.items():
        iters = rcfg.self_train.iters if rcfg.train.setting == "transductive" else rcfg.train.iters
        m, diffs = nearest_measured("train", run_facts(rcfg, plan.shape, "train", wf))
        if m is None:
            lines.append(f"  {run:<22} {iters:>7,} it: no GPU measurement of this path")
            continue
        wall = iters * train_batch_plan(rcfg, wf).accumulation / m.rate * seeds
        total_train += wall * gpus * nodes
        serial += wall
        differs = f"; differs: {', '.join(diffs)}" if diffs else ""
        lines.append(f"  {run:<22} {iters:>7,} it at {m.rate} it/s: {fmt_duration(wall)} on {gpus * nodes} "
                     f"GPUs = {wall * gpus * nodes / 3600:.1f} GPU h{differs}")
    val = split_facts(cfg, cfg.dataset.name, cfg.dataset.root, cfg.dataset.val_split).images
    m, diffs = nearest_measured("evaluate", run_facts(cfg, plan.shape, "evaluate", wf))
    total_eval = 0.0
    if m is not None and val and eval_gpus:
        runs = len(plan.run_cfgs) * seeds + len(cfg.extra.get("cross_eval") or []) + 1  # + frozen CLIP
        total_eval = runs * val / m.rate
        differs = f"; differs: {', '.join(diffs)}" if diffs else ""
        lines.append(f"  evaluation: {runs} x {val:,} images at {m.rate} images/s per GPU: "
                     f"{total_eval / 3600:.1f} GPU h{differs} (cross-dataset ones counted at this size)")
    else:
        lines.append("  evaluation: not projected (no GPU measurement, or no images counted)")
    total = (total_train + total_eval) / 3600
    lines.append(f"  total: {total:.0f} GPU h (training {total_train / 3600:.0f}, "
                 f"evaluation {total_eval / 3600:.1f}); the training jobs one after another on "
                 f"{gpus * nodes} GPUs: {fmt_duration(serial)}")
    lines.append(f"  measured: {MEASURED[0].source} ({MEASURED[0].caveat}); fp32 not measured")
    return lines

