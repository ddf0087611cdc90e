"""The paper's experiments as workflows: its figures as data, one config per ablation grid whose
rows build the models their tables describe, and the direction check (the grids' DAGs hold
every row: tests/test_workflow.py)."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
import yaml

from cascade_clip.config import load_config, shared_cache_stages
from cascade_clip.model.head import release_parameters
from cascade_clip.paper import (
    compare,
    paper_row,
    paper_rows,
    paper_tables,
    row_overrides,
    row_paper_ids,
)

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {"coco_stuff_ablations": "coco_stuff", "voc_ablations": "voc", "shapes_ablations": "config"}
ABLATION_TABLES = ("t4", "t5", "t6", "t7", "t8", "t9")


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


def _named(name: str) -> set[str]:
    return {i for row in _load(name)["ablations"].values() for i in row_paper_ids(row)}


def _split(row_id: str) -> list[list[int]]:
    """t6.3-5_6-8_9-11_12 -> [[3, 4, 5], [6, 7, 8], [9, 10, 11], [12]]."""
    stages = []
    for part in row_id.split(".", 1)[1].split("_"):
        lo, _, hi = part.partition("-")
        stages.append(list(range(int(lo), int(hi or lo) + 1)))
    return stages


def test_the_paper_figures_as_data():
    rows, tables = paper_rows(), paper_tables()
    assert list(tables) == ["t2", "t3", "release", "t4", "t5", "t6", "t7", "t8", "t9", "t10"]
    counts = {name: len(t.rows) for name, t in tables.items()}
    assert counts == {"t2": 8, "t3": 4, "release": 6, "t4": 3, "t5": 3, "t6": 5, "t7": 3, "t8": 6, "t9": 2,
                      "t10": 24}
    for row in rows.values():
        # a transcription check: each quoted hIoU is 2SU/(S+U) up to the paper's rounding
        assert abs(row.h - 2 * row.S * row.U / (row.S + row.U)) <= 0.1, row.id
        assert row.vs is None or row.vs in rows, row.id
        assert row.dataset in ("coco_stuff_164k", "voc12", "pascal_context_59"), row.id
    assert [rows[i].params_m for i in tables["t7"].rows] == [40.5, 40.5, 40.5]
    assert paper_row("t8.nga_learnable").label == "NGA†" and paper_row("t8.sum_learnable").label == "sum†"
    assert rows["t10.voc12.zegclip_fs_ours"].vs == "t10.voc12.zegclip_fs"
    fs = rows["t10.voc12.zegclip_fs"]
    assert fs.setting == "fully_supervised" and fs.h_computed
    assert rows["release.voc12.transductive"].source == "release_readme"
    assert rows["t4.cascade"].source == rows["t2.voc12.cascade_clip"].source == "paper"
    assert rows["t3.pascal_context_59.zegclip_st"].h == 47.1
    with pytest.raises(ValueError, match="unknown paper row 't4.nope'"):
        paper_row("t4.nope")


def test_main_results_are_the_papers_tables_2_and_3_then_the_release():
    """The main run and its self-training run stand beside the paper's Cascade-CLIP rows of
    Tables 2 and 3, then the release README's averages; Table 10's rows that repeat Table 2
    carry the same figures (a transcription check)."""
    from cascade_clip.paper import main_result_rows

    want = {("coco_stuff_164k", "inductive"): (41.1, 43.4, 42.2),
            ("coco_stuff_164k", "transductive"): (41.7, 62.5, 50.0),
            ("voc12", "inductive"): (92.7, 83.1, 87.7), ("voc12", "transductive"): (93.3, 93.4, 93.4),
            ("pascal_context_59", "inductive"): (55.9, 47.2, 51.2),
            ("pascal_context_59", "transductive"): (56.4, 55.0, 55.7)}
    for (dataset, setting), (s, u, h) in want.items():
        paper, release = main_result_rows(dataset, setting)
        assert (paper.S, paper.U, paper.h, paper.source) == (s, u, h, "paper"), (dataset, setting)
        assert paper.table in ("t2", "t3") and paper.setting == setting and paper.dataset == dataset
        assert release.id == f"release.{dataset}.{setting}" and release.source == "release_readme"
    assert main_result_rows("shapes", "inductive") == main_result_rows("voc12", "fully_supervised") == []
    rows = paper_rows()
    for ds in ("coco_stuff_164k", "voc12"):
        for t10, t2 in (("zegclip", "zegclip"), ("zegclip_ours", "cascade_clip"),
                        ("zegclip_st", "zegclip_st"), ("zegclip_ours_st", "cascade_clip_st")):
            a, b = rows[f"t10.{ds}.{t10}"], rows[f"t2.{ds}.{t2}"]
            assert (a.S, a.U, a.setting) == (b.S, b.U, b.setting) and not a.grid, (ds, t10)


def test_grids_name_every_row_of_their_tables():
    coco = [i for t in ABLATION_TABLES for i in paper_tables()[t].rows]
    t10 = [i for i in paper_tables()["t10"].rows if paper_row(i).grid]  # SPT-SEG etc.: run by no grid
    coco += [i for i in t10 if ".coco_stuff_164k." in i]
    voc = [i for i in t10 if ".voc12." in i]
    assert _named("coco_stuff_ablations") == set(coco)
    assert _named("voc_ablations") == set(voc)
    assert _named("shapes_ablations") == set(coco)


@pytest.mark.parametrize("grid", GRIDS)
def test_a_grid_is_its_base_config_plus_rows(grid):
    """Only the rows (and, for the miniature, its experiment name and seeds) differ from the
    config the grid extends; the real grids are the same experiment as their base."""
    ours, base = _load(grid), _load(GRIDS[grid])
    for key in ("ablations", "workflow", "experiment"):
        ours.pop(key), base.pop(key)
    assert ours == base
    wf, base_wf = _load(grid)["workflow"], dict(_load(GRIDS[grid])["workflow"])
    if grid == "shapes_ablations":
        assert wf.pop("seeds") == [0, 1, 2] and wf.pop("self_train") is False and base_wf.pop("self_train")
        assert _load(grid)["experiment"] == "shapes_ablations"
    else:
        assert _load(grid)["experiment"] == _load(GRIDS[grid])["experiment"]
    assert wf == base_wf
    renamed = {"single_decoder": "t4_no_cascade"}  # the demo's one decoder, named after its table
    base_rows = {k: row_overrides(v) for k, v in _load(GRIDS[grid])["ablations"].items()}
    grid_rows = {k: row_overrides(v) for k, v in _load(grid)["ablations"].items()}
    for name, row in base_rows.items():  # a base row keeps its meaning (and, in the real grids, its name)
        assert grid_rows[renamed.get(name, name) if grid == "shapes_ablations" else name] == row, name


def _models(grid: str) -> dict[str, tuple]:
    """run -> (its config, the CascadeCLIP it builds), the vision tower on the meta device."""
    from cascade_clip.model import CascadeCLIP
    from cascade_clip.plan.sizes import meta_vision_tower, run_configs

    path = ROOT / "config" / f"{grid}.yaml"
    visual = meta_vision_tower(load_config(path))
    out = {}
    for run, cfg in run_configs(path).items():
        with torch.device("meta"):
            out[run] = (cfg, CascadeCLIP(types.SimpleNamespace(visual=visual), cfg.model))
    return out


def _structure(model) -> dict:
    head = model.head
    return {
        "stages": [f.num_blocks for f in head.fusions],
        "fusion": sorted({f.mode for f in head.fusions if f.mode != "identity"}),
        "decoders": len(head.decoders),
        "query_projections": len(head.query_projs),
        "learnable_weights": all(f.weights.requires_grad for f in head.fusions if hasattr(f, "weights")),
    }


def test_each_coco_row_builds_the_model_of_its_table(capsys):
    """Stages, decoders, fusion kind, query projections, encoder mode and setting per row; the
    parameters as the paper counts them beside its 40.5 M (Table 7: all three at the same)."""
    models = _models("coco_stuff_ablations")
    ablations = _load("coco_stuff_ablations")["ablations"]
    main = [[6, 7, 8], [9, 10, 11], [12]]
    for run, (cfg, model) in models.items():
        row = ablations.get(run.removesuffix("_st"), {})
        ids = row_paper_ids(row)
        s = _structure(model)
        stages = cfg.model.stages
        split_ids = [i for i in ids if i.split(".")[0] in ("t5", "t6")]
        for i in split_ids:  # the row id spells its split: the row taps exactly it
            assert stages == _split(i), (run, i)
        if not split_ids and "model.stages" not in row:
            assert stages == main, run
        per = cfg.model.decoders_per_stage
        expected_decoders = (len(stages) if cfg.model.cascade else 1) * per
        assert s["decoders"] == expected_decoders, run
        assert s["stages"] == ([len(x) for x in stages] if cfg.model.cascade else [sum(map(len, stages))])
        shared = cfg.model.query_projection == "shared"
        assert s["query_projections"] == (1 if shared else expected_decoders)
        assert cfg.model.encoder_mode == ("frozen" if any(".frozen_clip" in i for i in ids) else "vpt"), run
        fs = any("zegclip_fs" in i for i in ids)
        assert cfg.train.setting == ("fully_supervised" if fs else "transductive" if run.endswith("_st")
                                     else "inductive"), run
    # what each table varies, read back from the built models
    st = {run: _structure(m) for run, (_, m) in models.items()}
    assert st["cascade"] == {"stages": [3, 3, 1], "fusion": ["nga"], "decoders": 3, "query_projections": 3,
                             "learnable_weights": True}
    assert st["t4_no_cascade"]["decoders"] == 1 and st["t4_cascade_sum"]["fusion"] == ["sum"]
    assert st["t8_concat"]["fusion"] == ["concat"] and st["t8_attention"]["fusion"] == ["attention"]
    assert st["t8_nga"]["fusion"] == ["nga"] and not st["t8_nga"]["learnable_weights"]
    assert st["t8_sum_learnable"]["fusion"] == ["weighted_sum"]
    assert st["t8_sum_learnable"]["learnable_weights"]
    assert st["t9_shared"]["query_projections"] == 1
    assert st["t7_last_layer"]["stages"] == [1] and st["t7_last_layer"]["decoders"] == 3
    assert st["t7_multi_layer_fusion"]["stages"] == [7] and st["t7_multi_layer_fusion"]["decoders"] == 3

    counts = {run: release_parameters(m) for run, (_, m) in models.items()}
    ours = {run: sum(p.numel() for p in m.parameters() if p.requires_grad) for run, (_, m) in models.items()}
    assert ours["cascade"] == 22_064_646 + 1_052_928  # tests/test_official.py: head + COCO's prompts
    assert counts["cascade"] == 40_463_622
    for run in ("cascade", "t7_last_layer", "t7_multi_layer_fusion"):
        assert round(counts[run] / 1e6, 1) == 40.5, (run, counts[run])  # the paper's Params
    with capsys.disabled():
        print("\nparameters (ours / as the paper counts / the paper's Table 7):")
        for run in ("cascade", "t7_last_layer", "t7_multi_layer_fusion", "t4_no_cascade"):
            given = "40.5 M" if run != "t4_no_cascade" else "-"
            print(f"  {run:<22} {ours[run]:>11,} / {counts[run]:>11,} / {given}")


def test_each_miniature_row_keeps_what_its_table_varies():
    """The 6-block CLIP's splits: as many stages as the paper's row, starting no later than
    the paper's relative to the main split, the last block alone exactly when block 12 is."""
    models = _models("shapes_ablations")
    ablations = _load("shapes_ablations")["ablations"]
    assert ablations["cascade"].get("model.stages") is None  # the demo's [[3, 4], [5], [6]]
    for run, row in ablations.items():
        cfg, model = models[run]
        assert cfg.model.encoder_mode == "frozen" and max(b for s in cfg.model.stages for b in s) == 6
        for i in row_paper_ids(row):
            if i.split(".")[0] not in ("t5", "t6"):
                continue
            paper = _split(i)
            assert len(cfg.model.stages) == len(paper), (run, i)
            assert (cfg.model.stages[-1] == [6]) == (paper[-1] == [12]), (run, i)
            assert (cfg.model.stages[0][0] < 3) == (paper[0][0] < 6), (run, i)
            assert (cfg.model.stages[0][0] > 3) == (paper[0][0] > 6), (run, i)
    # the same structures as the COCO grid where the model allows it
    assert _structure(models["t7_last_layer"][1])["decoders"] == 3
    assert _structure(models["t8_sum_learnable"][1])["fusion"] == ["weighted_sum"]


def test_shared_cache_stages():
    main = [[3, 4], [5], [6]]
    assert shared_cache_stages(main, [main, [[6]]]) == main  # every run taps a subset: the config's
    assert shared_cache_stages(main, [main, [[1, 2], [3]], [[6]]]) == [[1, 2, 3, 4, 5, 6]]
    assert shared_cache_stages(main, [[[6]]]) == [[6]]  # only what the cached runs tap
    assert shared_cache_stages(main, []) == main


def test_direction_verdicts():
    p, ref = paper_row("t4.no_cascade"), paper_row("t4.cascade_nga")  # the paper: -1.0 S, -3.9 U, -2.4 h

    def ours(s, u, h, std):
        return {"S": s, "U": u, "h": h, "S_std": std, "U_std": std, "h_std": std}

    got = compare(ours(40.0, 45.0, 42.0, 1.0), ours(42.5, 43.0, 42.5, 0.5), p, ref)
    assert [(d.metric, d.verdict) for d in got] == [("S", "holds"), ("U", "reversed"), ("h", "within spread")]
    assert got[0].paper == pytest.approx(-1.0) and got[1].ours == pytest.approx(2.0) and got[2].spread == 1.0
    one = compare(ours(40.0, 45.0, 42.0, math.nan), ours(42.5, 43.0, 42.5, math.nan), p, ref)
    assert {d.verdict for d in one} == {"one seed"}


def test_a_row_naming_an_unknown_paper_row_is_refused_by_name():
    from cascade_clip.errors import InputError

    with pytest.raises(InputError, match=r"ablations\.cascade\.paper: unknown paper row 't4\.nope'"):
        load_config(ROOT / "config" / "config.yaml", {"ablations": {"cascade": {"paper": "t4.nope"}}})
    with pytest.raises(InputError, match="paper"):  # the schema: only dotted config keys and `paper`
        load_config(ROOT / "config" / "config.yaml", {"ablations": {"cascade": {"papers": "t4.cascade"}}})
