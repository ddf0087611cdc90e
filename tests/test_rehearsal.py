"""Rehearsals of the real configs (issue 14): each of config/coco_stuff.yaml, voc.yaml and
context.yaml runs the whole Snakemake workflow, through `snakemake` itself, on miniature
mirrors of its datasets (tests/rehearsal/mirrors.py) served on 127.0.0.1, with only the
overrides in tests/rehearsal/<config> merged over it. Every stage's outputs are checked,
not just the exit code.

The fast tests check the mirrors (real file names and layouts, every class present, the
converters' view of them), the overlays (they change only what a rehearsal may) and the DAG
of a `vpt` main run beside a `frozen` row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import string
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from rehearsal.mirrors import (
    COCO_KEPT_IDS,
    DERIVED,
    MirrorSpec,
    encode_rle,
    http_mirror,
    local_files,
    random_clip_weights,
    sha256_file,
    write_mirror,
    write_sources,
)

from cascade_clip.data.convert import decode_rle
from cascade_clip.data.registry import CONTEXT_59_DETAIL_IDS, DATASETS

ROOT = Path(__file__).resolve().parents[1]
REHEARSAL = ROOT / "tests" / "rehearsal"
# Image counts of the miniatures: 4 training images (one per cache shard), 1 validation image.
# Context-459's release mirrors Context-59's images.
SPECS = {name: MirrorSpec(train=4, val=1) for name in ("coco_stuff_164k", "voc12", "pascal_context_59",
                                                      "ade20k_150", "ade20k_847")}
CONFIGS = ("voc.yaml", "context.yaml", "coco_stuff.yaml")


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{("a", "b", "c"): value} for every non-mapping value of a nested mapping (keys as
    tuples: ablation rows have dotted keys of their own)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def label_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


# --- the mirrors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The three miniatures in one folder, served on 127.0.0.1 for the module's tests."""
    folder = tmp_path_factory.mktemp("mirror")
    datasets = write_mirror(folder, SPECS)
    with http_mirror(folder) as server:
        write_sources(folder / "sources.yaml", datasets, server.url)
        yield SimpleNamespace(folder=folder, url=server.url, datasets=datasets, server=server)


def test_rle_encoder_inverts_the_converters_decoder():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        mask = rng.random((h, w)) < rng.random()
        assert np.array_equal(decode_rle(encode_rle(mask)), mask)


def test_mirrors_download_and_prepare_to_every_class(mirror, tmp_path):
    """`download` from the local mirror (its sources file, sha256 checked; ADE20K-847 from the
    user's copy) then `prepare`: the split lists the mirror meant, and every class of each
    dataset, unseen ones included, in the converted labels (16-bit ones for Context-459 and
    ADE20K-847). Prints what each target's download + prepare costs."""
    from cascade_clip.cli import main
    from cascade_clip.data import label_ignore_index

    sources = yaml.safe_load((mirror.folder / "sources.yaml").read_text())
    local = [arg for item in local_files(mirror.datasets) for arg in ("--local", item)]
    seconds = {}
    for name, data in mirror.datasets.items():
        if name not in DERIVED:
            assert [e["name"] for e in sources[name]["files"]] == list(data.archives)
        start = time.perf_counter()
        assert main(["download", "--dataset", name, "--root", str(tmp_path / "dl"), "--sources",
                     str(mirror.folder / "sources.yaml"), "--no-progress", *local]) == 0
        out = tmp_path / "data" / name
        argv = ["prepare", "--dataset", name, "--downloads", str(tmp_path / "dl"), "--out", str(out)]
        assert main(argv) == 0
        seconds[name] = time.perf_counter() - start
        classes = json.loads((out / "dataset.json").read_text())["classes"]
        assert classes == list(DATASETS[name].classes)
        present = set()
        splits = [("train", data.train_ids)] if data.train_ids else []
        for split, ids in splits + [("val", data.val_ids)]:
            assert (out / "splits" / f"{split}.txt").read_text().split() == ids
            for i in ids:
                present |= set(np.unique(label_array(out / "labels" / split / f"{i}.png")).tolist())
        assert present - {label_ignore_index(len(classes))} == set(range(len(classes))), name
        assert data.train_ids or not (out / "splits" / "train.txt").exists()
        if name == "ade20k_847":  # MaskFormer's converter: OpenCV's nearest rule on the shrunk image
            check_ade847_as_maskformer(data, out)
        if name == "pascal_context_459":  # the peers' rule, pixel for pixel: LabelMap - 1, 0 -> ignore
            for i in data.val_ids:
                labelmap = release_labelmap(data.archives["trainval.tar.gz"], i)
                assert labelmap.max() > 59  # classes beyond the 59, which Detail's json lacks
                want = np.where(labelmap == 0, 65535, labelmap.astype(np.int64) - 1)
                assert np.array_equal(label_array(out / "labels" / "val" / f"{i}.png"), want), i
    requested = {path for path, _ in mirror.server.log}
    fetched = {n for name, d in mirror.datasets.items() if name not in DERIVED for n in d.archives}
    assert requested == {f"/{n}" for n in fetched if n != "ADE20K_2021_17_01.zip"}
    print("\ndownload + prepare of each miniature (s):", {k: round(v, 2) for k, v in seconds.items()})


def check_ade847_as_maskformer(data, out: Path) -> None:
    """The mirror's large validation image, shrunk to 512 on its short side: its label is the
    source label at OpenCV's nearest pixels (floor(x * src / dst), the rule of the
    `cv2.resize` MaskFormer's converter calls; tests/test_convert.py states it), the 847-class
    map applied."""
    import io
    import zipfile

    from test_convert import opencv_nearest_rows

    from cascade_clip.data.convert import ade20k_847_lut

    image_id = data.val_ids[0]
    with zipfile.ZipFile(data.archives["ADE20K_2021_17_01.zip"]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(f"/{image_id}_seg.png"))
        seg = np.asarray(Image.open(io.BytesIO(zf.read(member))), np.int64)
    index = seg[..., 0] // 10 * 256 + seg[..., 1]
    label = label_array(out / "labels" / "val" / f"{image_id}.png")
    h, w = index.shape
    assert min(h, w) > 512 and min(label.shape) == 512
    rows, cols = opencv_nearest_rows(h, label.shape[0]), opencv_nearest_rows(w, label.shape[1])
    want = ade20k_847_lut()[index][rows][:, cols]
    assert np.array_equal(label, want)
    with Image.open(out / "images" / "val" / f"{image_id}.jpg") as im:
        assert im.size == label.shape[::-1]


def release_labelmap(archive: Path, image_id: str) -> np.ndarray:
    """The LabelMap of `trainval/<image_id>.mat` in PASCAL-Context's trainval.tar.gz."""
    import io
    import tarfile

    from scipy.io import loadmat

    with tarfile.open(archive) as tar:
        data = tar.extractfile(f"trainval/{image_id}.mat").read()
    return loadmat(io.BytesIO(data))["LabelMap"]


def test_mirror_layouts_are_the_real_ones(mirror):
    """Spot checks of the archives' insides against the real releases' layouts."""
    import tarfile
    import zipfile

    names = {}
    for data in mirror.datasets.values():
        for archive, path in data.archives.items():
            if archive.endswith(".zip"):
                names[archive] = zipfile.ZipFile(path).namelist()
            elif archive.endswith((".tar", ".tgz", ".tar.gz")):
                names[archive] = tarfile.open(path).getnames()
    assert "train2017/000000000009.jpg" in names["train2017.zip"]
    assert "val2017/000000000139.png" in names["stuffthingmaps_trainval2017.zip"]
    voc = names["VOCtrainval_11-May-2012.tar"]
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in voc
    assert any(n.startswith("VOCdevkit/VOC2012/SegmentationClass/") for n in voc)
    sbd = names["benchmark.tgz"]
    assert "benchmark_RELEASE/dataset/val.txt" in sbd and any(n.endswith(".mat") for n in sbd)
    assert any(n.startswith("VOCdevkit/VOC2010/JPEGImages/") for n in names["VOCtrainval_03-May-2010.tar"])
    detail = json.loads(mirror.datasets["pascal_context_59"].archives["trainval_merged.json"].read_text())
    assert isinstance(detail["annos_segmentation"][0]["segmentation"]["counts"], str)  # compressed RLE
    assert {im["phase"] for im in detail["images"]} == {"train", "val"}
    # Detail's masks hold the 59 classes only (MMSegmentation's converter asserts it over the
    # real file); the 459 come from PASCAL-Context's own release.
    assert {a["category_id"] for a in detail["annos_segmentation"]} == {c for _, c in CONTEXT_59_DETAIL_IDS}
    assert len(detail["categories"]) == 459
    release = names["trainval.tar.gz"]
    assert "labels.txt" in release and "trainval/2008_000200.mat" in release
    labelmap = release_labelmap(mirror.datasets["pascal_context_459"].archives["trainval.tar.gz"],
                                "2008_000002")
    assert labelmap.dtype == np.uint16 and set(np.unique(labelmap)) == set(range(460))
    # COCO-Stuff maps never hold the 11 unused thing ids; VOC's are palette images.
    assert len(COCO_KEPT_IDS) == 171


# --- the overlays ------------------------------------------------------------------------------

# What a rehearsal may change (issue 14): the download source, the CLIP (random weights in a
# file, a narrower ViT for VOC and Context), iterations, images per step, crop and evaluation
# sizes, and processes per job.
ALLOWED = (
    "sources.", "clip.pretrained", "clip.model", "clip.model_config", "clip.image_size",
    "train.iters", "train.batch_size", "train.global_batch", "train.augment.crop_size", "train.augment.scale",
    "self_train.iters", "self_train.batch_size", "self_train.global_batch", "evaluate.",
    "workflow.train_gpus", "workflow.eval_gpus",
)


@pytest.mark.parametrize("config", CONFIGS)
def test_overlay_changes_only_what_a_rehearsal_may(config):
    overlay = read_yaml(REHEARSAL / config)
    changed = [".".join(key) for key in leaves(overlay)]
    assert changed
    for key in changed:
        assert key.startswith(ALLOWED), f"{config}: {key} is not a rehearsal override"
    assert set(overlay["sources"]) == {"base_url", "file"}
    assert overlay["clip"]["pretrained"].startswith("$CLIP/")
    if config == "coco_stuff.yaml":  # ViT-B/16 itself, at the real config's 512 px
        assert set(overlay["clip"]) == {"pretrained"}
        assert "crop_size" not in overlay.get("evaluate", {})


def snakemake(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(cwd), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def shell_commands(res: subprocess.CompletedProcess) -> list[str]:
    """The commands `snakemake -n -p` prints."""
    return [line.split("Shell command:", 1)[1].strip() for line in (res.stdout + res.stderr).splitlines()
            if "Shell command:" in line]


def test_vpt_main_run_with_a_frozen_row_caches_in_frozen_mode(tmp_path):
    """config/voc.yaml trains `cascade` with prompts (vpt) and the `frozen` row from the
    feature cache: the cache shards are written (and verified) in frozen mode, only the
    frozen row reads the cache, and self-training starts from the vpt run without it."""
    res = snakemake("-n", "-p", "--cores", "2", "--resources", "gpu=4", "--configfile",
                    str(ROOT / "config" / "voc.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    commands = shell_commands(res)
    shards = [c for c in commands if "cache-features" in c]
    assert len(shards) == 4 and all("--set model.encoder_mode=frozen" in c for c in shards), shards
    verify = [c for c in commands if "cache-verify" in c]
    assert verify and "--set model.encoder_mode=frozen" in verify[0]
    train = [c for c in commands if " train " in c and "--out results/voc12/runs/" in c]
    frozen = [c for c in train if "runs/frozen" in c]
    others = [c for c in train if "runs/frozen" not in c]
    assert len(frozen) == 1 and "--cache results/voc12/cache/train.h5" in frozen[0]
    assert "--set model.encoder_mode=frozen" in frozen[0]
    assert len(others) == 2 and not any("--cache" in c for c in others)  # cascade, cascade_st


def test_cross_dataset_evaluation_takes_the_cli_cross_path(tmp_path):
    """evaluate_cross evaluates the COCO-Stuff model on VOC and Context (its cross_eval) and,
    with workflow.open_vocab, on the whole suite, through evaluate's cross-dataset options
    (every class seen, the checkpoint's own classes not required), not by renaming the
    config's dataset, which the checkpoint check refuses. VOC-21 is converted from VOC's
    download, Context-459 from its own labels and Context-59's images; ADE20K-150 and -847
    have their own."""
    real = read_yaml(ROOT / "config" / "coco_stuff.yaml")
    assert real["workflow"]["open_vocab"] is False  # the suite is opt-in (ADE20K-847's registration)
    assert [c["dataset"] for c in real["cross_eval"]] == ["voc12", "pascal_context_59"]
    (tmp_path / "open_vocab.yaml").write_text("workflow: {open_vocab: true}\n")
    res = snakemake("-n", "-p", "--cores", "2", "--configfile", str(ROOT / "config" / "coco_stuff.yaml"),
                    str(tmp_path / "open_vocab.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    commands = shell_commands(res)
    cross = [c for c in commands if "cli evaluate" in c and "eval/cross/" in c]
    assert len(cross) == 6, cross
    for dataset in ("voc12", "pascal_context_59", "voc21", "ade20k_150", "pascal_context_459", "ade20k_847"):
        (command,) = [c for c in cross if f"eval/cross/{dataset}" in c]
        assert f"--dataset-root resources/data/{dataset} --dataset {dataset}" in command
        assert "--set dataset." not in command
    downloads = sorted(c.split("--dataset ")[1].split()[0] for c in commands if "cascade-clip download" in c)
    assert downloads == ["ade20k_150", "ade20k_847", "coco_stuff_164k", "pascal_context_459",
                         "pascal_context_59", "voc12"]


# --- the rehearsals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Where the rehearsals' random CLIP weights are written (ViT-B/16: 600 MB), removed after."""
    folder = tmp_path_factory.mktemp("clip")
    yield folder
    for path in folder.glob("*.pt"):
        path.unlink()


def overlay_file(config: str, mirror, clip_dir: Path, work: Path) -> tuple[Path, dict]:
    """tests/rehearsal/<config> with $MIRROR_URL, $MIRROR and $CLIP filled in, written to
    `work`; the CLIP weights it names are made if missing."""
    text = string.Template((REHEARSAL / config).read_text()).substitute(
        MIRROR_URL=mirror.url, MIRROR=str(mirror.folder), CLIP=str(clip_dir))
    path = work / f"rehearsal-{config}"
    path.write_text(text)
    overlay = yaml.safe_load(text)
    weights = Path(overlay["clip"]["pretrained"])
    if not weights.exists():
        clip = overlay["clip"]
        if clip.get("model_config"):
            random_clip_weights(weights, model_config=clip["model_config"])
        else:
            random_clip_weights(weights, model=read_yaml(ROOT / "config" / config)["clip"]["model"])
    return path, overlay


def stage_times(results: Path) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per benchmarked job, from Snakemake's benchmark files."""
    out = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        row = list(csv.DictReader(tsv.open(), delimiter="\t"))[-1]
        job = str(tsv.relative_to(results / "benchmarks").with_suffix(""))
        out[job] = (float(row["s"]), float(row["cpu_time"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_rehearsal(config, mirror, clip_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    overlay_path, overlay = overlay_file(config, mirror, clip_dir, work)
    env = dict(os.environ, CASCADE_CLIP_NUM_GPUS="4", CASCADE_CLIP_GPU_LOCKS=str(tmp_path / "gpu-locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)  # gpu-run's pool: 4 stand-in GPUs; torch runs on the CPU
    start = time.time()
    res = snakemake("--cores", "2", "--resources", "gpu=4", "--configfile", str(ROOT / "config" / config),
                    str(overlay_path), cwd=work, env=env, timeout=1800)
    wall = time.time() - start
    real = read_yaml(ROOT / "config" / config)
    results = work / "results" / real["experiment"]
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(results.rglob("*.log")))
    assert res.returncode == 0, res.stderr[-4000:] + logs[-8000:]
    check_rehearsal(work, results, real, overlay, mirror)
    times = stage_times(results)
    cpu = sum(c for _, c in times.values())
    print(f"\nrehearsal {config}: {wall:.0f} s wall, {cpu:.0f} s CPU in benchmarked jobs; "
          + ", ".join(f"{k} {w:.0f}/{c:.0f}" for k, (w, c) in times.items()))
    # Done is done: the same command again has nothing to run.
    again = snakemake("-n", "--cores", "2", "--resources", "gpu=4", "--configfile",
                      str(ROOT / "config" / config), str(overlay_path), cwd=work, env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    if config == "voc.yaml":  # the report as the README says to build it
        html = results / "report.html"
        built = snakemake("--report", str(html), "--configfile", str(ROOT / "config" / config),
                          str(overlay_path), cwd=work, env=env)
        assert built.returncode == 0, built.stderr[-3000:]
        assert html.stat().st_size > 10_000


def check_rehearsal(work: Path, results: Path, real: dict, overlay: dict, mirror) -> None:
    """Every stage's outputs, by stage."""
    import h5py
    import torch

    # The effective config: the real one, with only the overlay's values changed.
    resolved = read_yaml(results / "config.yaml")
    changed = leaves(overlay)
    for key, value in leaves(real).items():
        if not any(key[: len(c)] == c or c[: len(key)] == key for c in changed):
            assert lookup(resolved, key) == value, key
    for key, value in changed.items():
        assert lookup(resolved, key) == value, key
    name = resolved["dataset"]["name"]
    cross = [c["dataset"] for c in resolved["cross_eval"]]
    roots = {name: resolved["dataset"]["root"], **{c["dataset"]: c["root"] for c in resolved["cross_eval"]}}
    downloads = work / resolved["workflow"]["downloads_dir"]

    # download: every archive of the mirror, byte for byte; prepare: the mirror's images
    for dataset, root in roots.items():
        folder = downloads / dataset
        assert (folder / ".complete").is_file()
        for archive, source in mirror.datasets[dataset].archives.items():
            assert sha256_file(folder / archive) == sha256_file(source), archive
        meta = json.loads((work / root / "dataset.json").read_text())
        assert meta["classes"] == list(DATASETS[dataset].classes)
        data = mirror.datasets[dataset]
        for split, ids in (("train", data.train_ids), ("val", data.val_ids)):
            assert (work / root / "splits" / f"{split}.txt").read_text().split() == ids
            assert all((work / root / "labels" / split / f"{i}.png").is_file() for i in ids)
    classes = list(DATASETS[name].classes)

    # split
    split = json.loads((results / "split.json").read_text())
    assert split["unseen"] == [c for c in classes if c in resolved["dataset"]["unseen"]]
    assert len(split["seen"]) + len(split["unseen"]) == len(classes)

    # text embeddings: the dataset's and each cross-evaluation target's, unit rows
    width = (resolved["clip"]["model_config"] or {}).get("embed_dim", 512)
    for path, dataset in [(results / "text" / f"{name}.h5", name)] + [
            (results / "text" / "cross" / f"{d}.h5", d) for d in cross]:
        with h5py.File(path) as f:
            emb = f["embeddings"][:]
            assert emb.shape == (len(DATASETS[dataset].classes), width), path
            assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
            assert [n.decode() for n in f["class_names"][:]] == list(DATASETS[dataset].classes)
            assert f.attrs["weights_digest"].startswith("sha256:")  # read from the weights file

    # runs: main, ablation rows, self-training
    main = resolved["workflow"]["main_run"]
    runs = list(resolved["ablations"]) + ([f"{main}_st"] if resolved["workflow"]["self_train"] else [])
    frozen_runs = [r for r in runs if resolved["ablations"].get(r, {}).get("model.encoder_mode") == "frozen"]
    assert frozen_runs == (["frozen"] if name in ("coco_stuff_164k", "voc12") else [])

    # feature cache: N shards (ViT-B/16 at 512: 7 taps x 32x32 tokens x 512 in cache.encoding,
    # fp16 or int8; the global token fp16), each verified when written, and an index
    if frozen_runs:
        shards = int(resolved["workflow"]["cache_shards"])
        grid = (resolved["clip"]["image_size"] // 16) ** 2
        dtype = {"fp16": np.float16, "int8": np.int8}[resolved["cache"]["encoding"]]
        rows = 0
        for s in range(shards):
            with h5py.File(results / "cache" / "train" / f"shard-{s}-of-{shards}.h5") as f:
                assert bool(f.attrs["complete"]) and f.attrs["verified_rows"] == f.attrs["num_rows"]
                taps, glob = f["taps"], f["global_token"]
                assert taps.shape[1:] == (7, grid, width) and taps.dtype == dtype
                # Bytes on disk per image-view (README: 3.67 MB at ViT-B/16, 512 px in int8,
                # 7.34 MB in fp16).
                stored = taps.id.get_storage_size() + glob.id.get_storage_size()
                assert stored == taps.shape[0] * (7 * grid * width * np.dtype(dtype).itemsize + width * 2)
                rows += taps.shape[0]
        assert rows == len(mirror.datasets[name].train_ids)
        with h5py.File(results / "cache" / "train.h5") as f:
            assert int(f.attrs["num_rows"]) == rows and len(f["shard_files"]) == shards

    iters = {r: resolved["train"]["iters"] for r in resolved["ablations"]}
    iters[f"{main}_st"] = resolved["self_train"]["iters"]
    for run in runs:
        folder = results / "runs" / run
        state = torch.load(folder / "model_final.pt", map_location="cpu", weights_only=True)
        assert state["step"] == iters[run] and state["classes"] == classes
        assert sorted(state["unseen"]) == sorted(split["unseen"])
        assert state["setting"] == ("transductive" if run.endswith("_st") else "inductive")
        assert state["clip_weights"].startswith("sha256:")
        mode = "frozen" if run in frozen_runs else "vpt"
        assert state["config"]["model"]["encoder_mode"] == mode
        prompts = [k for k in state["model"] if "prompt" in k]
        assert bool(prompts) == (mode == "vpt"), (run, prompts[:3])
        assert all(torch.isfinite(v).all() for v in state["model"].values())
        assert (folder / "ckpt_half.pt").is_file()
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == iters[run] and math.isfinite(log[-1]["loss"])

    # evaluation: frozen CLIP, every run; cross-dataset: the main run on each target
    val_pixels = sum(int((label_array(work / roots[name] / "labels" / "val" / f"{i}.png") != 255).sum())
                     for i in mirror.datasets[name].val_ids)
    for run in ["frozen_clip"] + runs:
        folder = results / "eval" / run
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["num_images"] == len(mirror.datasets[name].val_ids) and metrics["dataset"] == name
        assert list(metrics["per_class_iou"]) == classes
        for key in ("miou", "miou_seen", "miou_unseen", "hiou"):
            assert metrics[key] is not None and math.isfinite(metrics[key]), (run, key)
        confusion = np.load(folder / "confusion.npy")
        assert confusion.shape == (len(classes), len(classes)) and confusion.sum() == val_pixels
        assert len(list(csv.DictReader((folder / "per_class.csv").open()))) == len(classes)
        assert list((folder / "examples").glob("*.png"))
    for dataset in cross:
        metrics = json.loads((results / "eval" / "cross" / dataset / "metrics.json").read_text())
        assert metrics["dataset"] == dataset
        assert metrics["num_images"] == len(mirror.datasets[dataset].val_ids)
        assert list(metrics["per_class_iou"]) == list(DATASETS[dataset].classes)
        assert metrics["miou"] is not None and metrics["miou_unseen"] is None  # every class seen

    # report
    report = results / "report"
    rows = list(csv.DictReader((report / "summary.csv").open()))
    assert [r["run"] for r in rows][: 1 + len(runs)] == ["frozen_clip"] + runs
    for dataset in cross:
        assert any(dataset in json.dumps(r) for r in rows), dataset
    for page in ("summary.html", "per_class.html", "runtimes.html"):
        assert (report / page).stat().st_size > 0
    assert (report / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((report / "examples").glob("*.png"))
    for log in results.rglob("*.log"):
        assert "Traceback" not in log.read_text(), log
