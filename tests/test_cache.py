"""The HDF5 feature cache and the text-embedding cache on a tiny CLIP and a tiny dataset (CPU)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from cascade_clip import cache
from cascade_clip.cache import (
    CacheError,
    CacheMismatchError,
    FeatureCacheDataset,
    join_shards,
    open_layout,
    to_tap_features,
    verify_cache,
    write_shard,
)
from cascade_clip.cache import write as cache_write
from cascade_clip.cache.encoding import ENCODINGS, decode, row_checksum
from cascade_clip.cli import main as cli_main
from cascade_clip.config import ClipConfig, config_from_dict, set_dotted
from cascade_clip.data.dataset import SegmentationDataset
from cascade_clip.data.transforms import TrainTransform
from cascade_clip.kernels.seg_loss import sigmoid_focal_dice_loss
from cascade_clip.model import load_clip
from cascade_clip.text_cache import load_text_embeddings

CLASSES = ["sky", "grass", "cat", "dog", "tree"]
UNSEEN = ["dog", "tree"]
NUM_IMAGES = 5


def _write_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "splits").mkdir(parents=True)
    ids = [f"img{i:02d}" for i in range(NUM_IMAGES)]
    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True)
    for i, image_id in enumerate(ids):
        h, w = 36 + 4 * i, 44 - 2 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images/train" / f"{image_id}.png"
        )
        label = np.zeros((h, w), np.uint8)
        label[h // 2 :] = 1
        label[: h // 3, : w // 2] = 2 + (i % 3)  # cat, dog or tree
        label[-3:, -5:] = 255
        Image.fromarray(label, mode="L").save(root / "labels/train" / f"{image_id}.png")
    (root / "splits/train.txt").write_text("\n".join(ids) + "\n")
    meta = {"name": "tiny", "classes": CLASSES, "image_suffix": ".png", "label_suffix": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))


def _cfg_dict(root: Path, weights: Path, model_config: dict, **over) -> dict:
    d = {
        "experiment": "tiny",
        "seed": 3,
        "clip": {"model": "tiny", "pretrained": str(weights), "model_config": model_config,
                 "image_size": 32, "templates": "official-single"},
        "model": {"stages": [[2, 3], [4]],
                  "decoder": {"layers": 2, "heads": 2, "ffn_dim": 64, "dropout": 0.0}},
        "dataset": {"name": "tiny", "root": str(root), "unseen": UNSEEN},
        "train": {"augment": {"scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": 32,
                              "cat_max_ratio": 0.75}},
        "cache": {"views_per_image": 2, "batch_size": 3},
    }
    for dotted, value in over.items():
        set_dotted(d, dotted, value)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, tiny CLIP weights on disk, a config file, and the model."""
    from cascade_clip.testing import TINY_CLIP_CONFIG

    tmp = tmp_path_factory.mktemp("cache_world")
    root = tmp / "data"
    _write_dataset(root)
    torch.manual_seed(0)
    clip, _ = load_clip(ClipConfig(model="tiny", pretrained="random", model_config=TINY_CLIP_CONFIG,
                                         image_size=32))
    weights = tmp / "tiny_clip.pt"
    torch.save(clip.state_dict(), weights)
    d = _cfg_dict(root, weights, TINY_CLIP_CONFIG)
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    cfg = config_from_dict(d)
    model = cache.build_model(cfg)
    return {"tmp": tmp, "root": root, "weights": weights, "dict": d, "cfg": cfg, "cfg_path": cfg_path,
            "model": model, "clip_config": TINY_CLIP_CONFIG}


def _cfg(world, **over):
    return config_from_dict(_cfg_dict(world["root"], world["weights"], world["clip_config"], **over))


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def joined(world):
    """Two shards written and joined once for the module."""
    out = world["tmp"] / "cache"
    shards = [write_shard(world["cfg"], "train", (i, 2), out / f"shard-{i}-of-2.h5", model=world["model"],
                          progress=False, log=_quiet) for i in range(2)]
    index = join_shards(shards, out / "train.h5")
    return {"shards": shards, "index": index}


def test_write_join_verify_read(world, joined):
    cfg = world["cfg"]
    summary = verify_cache(joined["index"], cfg, progress=False)
    assert summary["rows"] == NUM_IMAGES * 2 and summary["shards"] == 2
    assert summary["max_norm_error"] < 1e-2
    with h5py.File(joined["shards"][0]) as f:
        assert f["taps"].chunks == (1, 3, 16, 32) and f["taps"].dtype == np.int8  # cache.encoding's default
        assert f["taps"].compression is None
        for key in ("model", "weights_digest", "tapped_blocks", "tap_projection", "tap_seed", "input_size",
                    "mean", "std", "image_list_digest", "code_version", "format_version"):
            assert key in f.attrs
        assert f.attrs["weights_digest"].startswith("sha256:")
    ds = FeatureCacheDataset(joined["index"], cfg, mode="inductive")
    assert len(ds) == NUM_IMAGES * 2
    item = ds[3]
    assert item["taps"].shape == (3, 16, 32) and item["taps"].dtype == torch.int8
    assert item["global_token"].shape == (32,) and item["label"].shape == (32, 32)
    assert item["label"].dtype == torch.int64
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    feats = to_tap_features(batch)
    assert feats.taps.shape == (3, 4, 16, 32) and feats.taps.dtype == torch.float32
    assert feats.grid == (4, 4) and feats.global_token.shape == (4, 32)
    # every image appears views_per_image times, views differ
    assert sorted(open_layout(joined["index"]).image_index.tolist()) == sorted(list(range(NUM_IMAGES)) * 2)


def test_batched_read_groups_rows_by_shard_and_keeps_order(world, joined, monkeypatch):
    """__getitems__ (the DataLoader's batched fetch) returns exactly the rows asked for, in
    the order asked, repeats and both shards included, with one HDF5 read per shard."""
    ds = FeatureCacheDataset(joined["index"], world["cfg"], mode="inductive")
    layout = open_layout(joined["index"])
    indices = [len(ds) - 1, 0, 3, 0, len(ds) // 2]
    reads = []
    original = FeatureCacheDataset._read_rows
    monkeypatch.setattr(FeatureCacheDataset, "_read_rows",
                        lambda self, shard, local: reads.append(shard) or original(self, shard, local))
    items = ds.__getitems__(indices)
    assert sorted(reads) == sorted(set(reads)) and len(set(reads)) == 2  # one read per shard
    for i, item in zip(indices, items):
        shard, local = layout.locate(int(ds.rows[i]))
        with h5py.File(layout.shard_files[shard]) as f:  # the row, read directly
            assert np.array_equal(item["taps"].numpy(), f["taps"][local])
            assert np.array_equal(item["global_token"].numpy(), f["global_token"][local])
        assert item["id"] == layout.ids[int(ds.rows[i])]


def test_label_modes_and_views_match_the_online_loader(world, joined):
    cfg = world["cfg"]
    unseen_ids = [CLASSES.index(n) for n in UNSEEN]
    online = SegmentationDataset(world["root"], "train", unseen=UNSEEN, mode="inductive",
                                 transform=TrainTransform(cfg.train.augment, return_view=True), seed=cfg.seed)
    modes = {m: FeatureCacheDataset(joined["index"], cfg, mode=m)
             for m in ("inductive", "transductive", "fully_supervised")}
    seen_unseen = False
    for i in range(len(modes["inductive"])):
        items = {m: ds[i] for m, ds in modes.items()}
        full = items["fully_supervised"]["label"]
        is_unseen = torch.isin(full, torch.tensor(unseen_ids))
        seen_unseen |= bool(is_unseen.any())
        assert (items["inductive"]["label"][is_unseen] == 255).all()
        assert (items["transductive"]["label"][is_unseen] == 254).all()
        assert torch.equal(items["inductive"]["label"][~is_unseen], full[~is_unseen])
        # view v of image i is the online loader's view at epoch v
        online.set_epoch(items["inductive"]["view"])
        ref = online[items["inductive"]["index"]]
        assert ref["view"] == modes["inductive"].view(i)
        assert torch.equal(ref["label"], items["inductive"]["label"])
    assert seen_unseen


def test_drop_unseen_images_filters_rows(world, joined):
    cfg = _cfg(world, **{"dataset.drop_unseen_images": True})
    ds = FeatureCacheDataset(joined["index"], cfg, mode="inductive")
    # images 1, 2 (dog, tree), 4 (dog) hold unseen classes: images 0 and 3 remain
    assert sorted({ds[i]["index"] for i in range(len(ds))}) == [0, 3]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cached_loss_equals_online_loss(world, encoded, encoding):
    """The head's loss from cached features equals the loss with the encoder run online:
    to fp16's rounding, and for int8 (~1% per token) within 1% (loss) and 5% (gradients)."""
    cfg, model = _cfg(world, **{"cache.encoding": encoding}), world["model"]
    text_path = world["tmp"] / "text.h5"
    assert cli_main(["text-embeddings", "--config", str(world["cfg_path"]), "--out", str(text_path),
                     "--device", "cpu"]) == 0
    text, names = load_text_embeddings(text_path, cfg)
    assert names == CLASSES
    seen = [i for i, n in enumerate(CLASSES) if n not in UNSEEN]
    remap = torch.full((256,), 255, dtype=torch.long)
    remap[seen] = torch.arange(len(seen))

    ds = FeatureCacheDataset(encoded[encoding], cfg, mode="inductive")
    batch = default_collate([ds[i] for i in range(4)])
    online = SegmentationDataset(world["root"], "train", unseen=UNSEEN, mode="inductive",
                                 transform=TrainTransform(cfg.train.augment), seed=cfg.seed)
    images, labels = [], []
    for index, view in zip(batch["index"].tolist(), batch["view"].tolist()):
        online.set_epoch(view)
        item = online[index]
        images.append(item["image"])
        labels.append(item["label"])
    assert torch.equal(torch.stack(labels), batch["label"])

    def loss_and_grads(feats):
        model.zero_grad()
        logits = model.forward_features(feats, text[seen])
        loss = sigmoid_focal_dice_loss(logits, remap[batch["label"]])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.head.parameters() if p.grad is not None]

    model.train()
    with torch.no_grad():
        online_feats = model.encode(torch.stack(images))
    loss_cached, grads_cached = loss_and_grads(to_tap_features(batch))
    loss_online, grads_online = loss_and_grads(online_feats)
    model.eval()
    assert torch.isfinite(loss_online) and loss_online > 0
    if encoding == "fp16":
        torch.testing.assert_close(loss_cached, loss_online, rtol=2e-3, atol=1e-4)
        for gc, go in zip(grads_cached, grads_online):
            torch.testing.assert_close(gc, go, rtol=5e-2, atol=5e-4)
    else:
        torch.testing.assert_close(loss_cached, loss_online, rtol=1e-2, atol=1e-3)
        gc = torch.cat([g.flatten() for g in grads_cached])
        go = torch.cat([g.flatten() for g in grads_online])
        assert float((gc - go).norm() / go.norm()) < 0.05


def test_block_subset_reads_and_foreign_cache_is_refused(world, joined):
    sub = FeatureCacheDataset(joined["index"], _cfg(world, **{"model.stages": [[4], [3]]}))
    full = FeatureCacheDataset(joined["index"], world["cfg"])
    assert torch.equal(sub[0]["taps"], full[0]["taps"][[2, 1]])
    assert sub.blocks == [4, 3] and sub.cached_blocks == full.blocks == [2, 3, 4]
    cases = {
        "tapped_blocks": {"model.stages": [[1, 2], [4]]},
        "tap_seed": {"model.tap_seed": 7},
        "views_per_image": {"cache.views_per_image": 3},
        "seed": {"seed": 4},
        "augment": {"train.augment.flip": False},
        "unseen": {"dataset.unseen": ["dog"]},
    }
    for field, over in cases.items():
        with pytest.raises(CacheMismatchError, match=f"'{field}'") as info:
            FeatureCacheDataset(joined["index"], _cfg(world, **over))
        assert str(joined["index"]) in str(info.value)
    other = dict(world["clip_config"], embed_dim=16)
    cfg = config_from_dict(_cfg_dict(world["root"], world["weights"], other))
    with pytest.raises(CacheMismatchError, match="'weights_digest'"):
        verify_cache(joined["index"], cfg, progress=False)


def test_truncated_corrupt_and_missing_files(world, joined, tmp_path):
    shard = joined["shards"][1]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CacheError, match="truncated.h5.*truncated or corrupt"):
        open_layout(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(CacheError, match="garbage.h5"):
        FeatureCacheDataset(garbage, world["cfg"])
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        open_layout(tmp_path / "nope.h5")
    # a flipped data chunk (a NaN bit pattern in fp16, -1s in int8) is caught by verify, naming
    # the file and row: by the row's checksum, and by its values where the checksum was
    # rewritten to match
    bad = tmp_path / "bad.h5"
    bad.write_bytes(shard.read_bytes())
    with h5py.File(bad) as f:
        info = f["taps"].id.get_chunk_info(2)
        offset, row = info.byte_offset, info.chunk_offset[0]
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 64)
    with pytest.raises(CacheError, match=f"bad.h5: row {row} differs from what was written"):
        verify_cache(bad, world["cfg"], progress=False)
    with h5py.File(bad, "r+") as f:
        f["checksum"][row] = row_checksum(f["taps"][row], f["global_token"][row])
    bad_values = {"fp16": "holds non-finite", "int8": "has a token whose largest int8 value is 1,"}
    bad_values = bad_values[world["cfg"].cache.encoding]
    with pytest.raises(CacheError, match=f"bad.h5: row {row} taps {bad_values}"):
        verify_cache(bad, world["cfg"], progress=False)


def test_missing_shard_is_a_clear_error(world, joined, tmp_path):
    with pytest.raises(CacheError, match=r"shard\(s\) \[1\] of 2 missing"):
        join_shards(joined["shards"][:1], tmp_path / "j.h5")
    with pytest.raises(FileNotFoundError, match="shard file not found"):
        join_shards([joined["shards"][0], tmp_path / "shard-1-of-2.h5"], tmp_path / "j.h5")
    # an index whose shard disappeared after the join
    copies = []
    for s in joined["shards"]:
        copies.append(tmp_path / s.name)
        copies[-1].write_bytes(s.read_bytes())
    index = join_shards(copies, tmp_path / "j.h5")
    with h5py.File(copies[0], "r+") as f:  # as if shard 0 were rewritten after the join
        uid = f.attrs["shard_uid"]
        f.attrs["shard_uid"] = "0" * 32
    with pytest.raises(CacheError, match="shard-0-of-2.h5 was rewritten after the join"):
        open_layout(index)
    with h5py.File(copies[0], "r+") as f:
        f.attrs["shard_uid"] = uid
    copies[1].unlink()
    with pytest.raises(CacheError, match=r"shard 1/2 .*shard-1-of-2.h5 is missing"):
        FeatureCacheDataset(index, world["cfg"])
    with pytest.raises(CacheError, match="exists"):
        join_shards(copies[:1], index)


def test_disk_full_keeps_partial_and_verified_cache(world, joined, tmp_path, monkeypatch):
    out = tmp_path / "shard.h5"
    out.write_bytes(joined["shards"][0].read_bytes())  # a complete, verified cache for seed 3
    before = out.read_bytes()
    cfg = _cfg(world, seed=5)
    calls = {"n": 0}
    real = cache_write._write_rows

    def full_disk(f, start, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, start, rows)

    monkeypatch.setattr(cache_write, "_write_rows", full_disk)
    with pytest.raises(CacheError, match=r"shard.h5.partial: disk full after 3/4 rows.*rerun to resume"):
        write_shard(cfg, "train", (0, 2), out, model=world["model"], overwrite=True, progress=False,
                    log=_quiet)
    assert out.read_bytes() == before
    assert cache.partial_path(out).exists()
    # a rerun without --overwrite refuses to touch the other config's cache, naming the field
    monkeypatch.setattr(cache_write, "_write_rows", real)
    with pytest.raises(CacheMismatchError, match="'seed'.*kept"):
        write_shard(cfg, "train", (0, 2), out, model=world["model"], progress=False, log=_quiet)
    logs = []
    write_shard(cfg, "train", (0, 2), out, model=world["model"], overwrite=True, progress=False,
                log=logs.append)
    assert any("resuming after 3/4" in m for m in logs)
    assert not cache.partial_path(out).exists()
    verify_cache(out, cfg, progress=False)


def test_killed_shard_resumes_to_the_same_file(world, joined, tmp_path):
    """A writer killed (os._exit) after writing but before marking a batch resumes where it
    stopped, through the CLI, and gives the same features as an uninterrupted run."""
    out = tmp_path / "shard-0-of-2.h5"
    script = textwrap.dedent(f"""
        import os
        from cascade_clip.cache import write
        from cascade_clip.cli import main
        real, calls = write._write_rows, [0]
        def killer(f, start, rows):
            real(f, start, rows)
            calls[0] += 1
            if calls[0] == 2:
                os._exit(9)  # killed after flushing the rows, before their done flags
        write._write_rows = killer
        main(["cache-features", "--config", {str(world["cfg_path"])!r}, "--shard", "0/2",
              "--out", {str(out)!r}, "--device", "cpu", "--workers", "0"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() and cache.partial_path(out).exists()
    with h5py.File(cache.partial_path(out)) as f:
        assert cache_write.done_prefix(f) == 3
    args = ["cache-features", "--config", str(world["cfg_path"]), "--shard", "0/2", "--out", str(out),
            "--device", "cpu", "--workers", "0"]
    assert cli_main([*args[:-1], "2"]) == 0  # resumed with two decoding workers
    with h5py.File(out) as a, h5py.File(joined["shards"][0]) as b:
        np.testing.assert_array_equal(a["taps"][:], b["taps"][:])
        np.testing.assert_array_equal(a["view"][:], b["view"][:])
    assert cli_main(args) == 0  # complete: nothing to do
    assert cli_main(["cache-verify", "--config", str(world["cfg_path"]), "--cache", str(out)]) == 0


def test_cli_join_verify_and_refusals(world, joined, tmp_path, capsys):
    cfg_path = str(world["cfg_path"])
    index = tmp_path / "train.h5"
    assert cli_main(["cache-join", "--inputs", *map(str, joined["shards"]), "--out", str(index)]) == 0
    assert cli_main(["cache-verify", "--config", cfg_path, "--cache", str(index), "--sample", "3"]) == 0
    val = ["cache-features", "--config", cfg_path, "--split", "val", "--out", str(tmp_path / "v.h5")]
    assert cli_main(val) == 2
    assert "Validation is evaluated online" in capsys.readouterr().err
    assert cli_main(["cache-features", "--config", cfg_path, "--set", "model.encoder_mode=vpt",
                     "--out", str(tmp_path / "v.h5")]) == 2
    assert "encoder_mode is 'vpt'" in capsys.readouterr().err
    assert cli_main(["cache-verify", "--config", cfg_path, "--set", "model.tap_seed=1",
                     "--cache", str(index)]) == 2
    assert "'tap_seed'" in capsys.readouterr().err
    assert cli_main(["cache-features", "--config", cfg_path, "--shard", "2/2", "--out", "x.h5"]) == 2


def test_text_embeddings_provenance(world, tmp_path):
    from cascade_clip.text_cache import compute_text_embeddings, write_text_embeddings

    cfg = world["cfg"]
    emb, names = compute_text_embeddings(cfg, device="cpu")
    assert emb.shape == (len(CLASSES), 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(CLASSES)))
    path = write_text_embeddings(tmp_path / "text.h5", cfg, emb, names)
    loaded, loaded_names = load_text_embeddings(path, cfg)
    assert torch.equal(loaded, emb) and loaded_names == CLASSES
    with pytest.raises(CacheMismatchError, match="'template_set'"):
        load_text_embeddings(path, _cfg(world, **{"clip.templates": "official-multi"}))
    with pytest.raises(CacheMismatchError, match="'weights_digest'"):
        load_text_embeddings(path, config_from_dict(
            _cfg_dict(world["root"], world["weights"], dict(world["clip_config"], embed_dim=16))))
    with pytest.raises(CacheMismatchError, match="'dataset'"):
        load_text_embeddings(path, _cfg(world, **{"dataset.name": "other"}))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    meta = json.loads((world["root"] / "dataset.json").read_text())
    meta["classes"] = [*CLASSES[:-1], "bush"]
    (renamed / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="'class_names'"):
        load_text_embeddings(path, _cfg(world, **{"dataset.root": str(renamed)}))
    (tmp_path / "bad.h5").write_bytes(b"x" * 10)
    with pytest.raises(CacheError, match="bad.h5"):
        load_text_embeddings(tmp_path / "bad.h5", cfg)


# --- what changes the features is compared (issue 24) ----------------------------------------


def _config_keys(node: type, prefix: str) -> list[str]:
    """Dotted keys of a config dataclass, nested sections walked."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(node)
    keys = []
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += _config_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# A value other than the world's for every key that changes what the encoder writes: a cache
# written before must be refused under it. A key added to provenance.FEATURE_KEYS needs one here.
OTHER_VALUE = {
    "seed": 4,
    "clip.model": "other",
    "clip.pretrained": "random",
    "clip.model_config": dict(__import__("cascade_clip.testing").testing.TINY_CLIP_CONFIG, embed_dim=16),
    "clip.image_size": 40,
    "clip.pos_resize": "bicubic",
    "model.stages": [[1, 2], [4]],
    "model.tap_projection": "clip",
    "model.tap_seed": 7,
    "model.cls_token": "standard",
    "dataset.name": "other",
    "dataset.unseen": ["dog"],
    "dataset.train_split": "val",
    "cache.views_per_image": 3,
    "cache.encoding": "fp16",
    **{f"train.augment.{k}": v for k, v in {
        "scale": [80, 40], "ratio_range": [0.75, 1.5], "crop_size": 40, "cat_max_ratio": 0.5,
        "flip": False, "photometric": False}.items()},
}


def test_every_key_that_changes_the_features_is_compared(world, joined):
    """Every key of the sections a cache row depends on (clip, model, dataset, cache,
    train.augment, seed) is classified in cache/provenance.py: recorded and compared, or listed
    as not changing the features. A new config key fails here until someone classifies it.
    Before issue 24, `cls_token` and `pos_resize` were written but never compared."""
    from cascade_clip.cache.provenance import FEATURE_KEYS, NOT_FEATURE_KEYS, PROVENANCE_FIELDS
    from cascade_clip.config import (
        AugmentConfig,
        CacheConfig,
        ClipConfig,
        DatasetConfig,
        ModelConfig,
    )

    keys = ["seed"]
    for section, node in (("clip", ClipConfig), ("model", ModelConfig), ("dataset", DatasetConfig),
                          ("cache", CacheConfig), ("train.augment", AugmentConfig)):
        keys += _config_keys(node, f"{section}.")
    unclassified = [k for k in keys if (k in FEATURE_KEYS) == (k in NOT_FEATURE_KEYS)]
    assert unclassified == [], "classify them in cascade_clip/cache/provenance.py"
    assert set(FEATURE_KEYS) | set(NOT_FEATURE_KEYS) == set(keys)  # no stale names either
    assert set(FEATURE_KEYS.values()) <= set(PROVENANCE_FIELDS)
    assert sorted(OTHER_VALUE) == sorted(FEATURE_KEYS)

    attrs, ids = open_layout(joined["index"]).attrs, SegmentationDataset(world["root"], "train").ids
    for key, value in OTHER_VALUE.items():
        cfg = _cfg(world, **{key: value})
        wanted = cache.provenance(cfg, cfg.dataset.train_split, ids)  # what the reader asks for
        with pytest.raises(CacheMismatchError, match=f"'{FEATURE_KEYS[key]}'"):
            cache.check_provenance(attrs, wanted, joined["index"])


def test_partial_and_shard_of_another_cls_token_are_not_used(world, joined, tmp_path, monkeypatch):
    """A `.partial` left by a writer under `cls_token: standard` is discarded, not resumed into
    a shard of mixed rows; a complete shard of that setting is refused, not 'already complete'."""
    standard = _cfg(world, **{"model.cls_token": "standard"})
    model = cache.build_model(standard)
    out = tmp_path / "shard-0-of-2.h5"
    real = cache_write._mark_done

    def stop_after_first_batch(f, start, stop):
        real(f, start, stop)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_write, "_mark_done", stop_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        write_shard(standard, "train", (0, 2), out, model=model, progress=False, log=_quiet)
    monkeypatch.undo()
    assert cache.partial_path(out).exists()
    logs = []
    write_shard(world["cfg"], "train", (0, 2), out, model=world["model"], progress=False, log=logs.append)
    assert any("discarding" in m and "cls_token" in m for m in logs), logs
    with h5py.File(out) as a, h5py.File(joined["shards"][0]) as b:
        np.testing.assert_array_equal(a["taps"][:], b["taps"][:])

    other = write_shard(standard, "train", (0, 2), tmp_path / "standard.h5", model=model, progress=False,
                        log=_quiet)
    with pytest.raises(CacheMismatchError, match="'cls_token'"):
        write_shard(world["cfg"], "train", (0, 2), other, model=world["model"], progress=False, log=_quiet)


# --- encodings ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(world):
    """Shard 0/2 written once in each encoding."""
    out = world["tmp"] / "encodings"
    return {enc: write_shard(_cfg(world, **{"cache.encoding": enc}), "train", (0, 2), out / f"{enc}.h5",
                             model=world["model"], progress=False, log=_quiet) for enc in ENCODINGS}


def test_int8_holds_half_the_bytes_and_reads_back_the_fp16_features(world, encoded):
    """int8 taps take exactly half of fp16's bytes, carry no scale, and decode to unit vectors
    within ~1% of the fp16 ones; the reader hands them out as stored and training decodes."""
    with h5py.File(encoded["fp16"]) as f16, h5py.File(encoded["int8"]) as f8:
        assert f8["taps"].dtype == np.int8 and f16["taps"].dtype == np.float16
        assert 2 * f8["taps"].id.get_storage_size() == f16["taps"].id.get_storage_size()
        assert set(f8) == set(f16)  # no scale dataset
        exact = torch.from_numpy(f16["taps"][:]).float()
        stored = torch.from_numpy(f8["taps"][:])
        assert (stored.abs().amax(-1) == 127).all()  # every token's peak at 127
        np.testing.assert_array_equal(f8["global_token"][:], f16["global_token"][:])
    decoded = decode(stored)
    torch.testing.assert_close(decoded.norm(dim=-1), torch.ones(decoded.shape[:-1]))
    assert float((decoded - exact).norm(dim=-1).max()) < 0.02
    cfg8 = _cfg(world, **{"cache.encoding": "int8"})
    ds = FeatureCacheDataset(encoded["int8"], cfg8)
    batch = default_collate([ds[0], ds[1]])
    assert batch["taps"].dtype == torch.int8
    feats = to_tap_features(batch)
    assert feats.taps.dtype == torch.float32
    torch.testing.assert_close(feats.taps, decode(stored[:2]).transpose(0, 1))
    summary = verify_cache(encoded["int8"], cfg8, progress=False)
    assert summary["encoding"] == "int8" and summary["rows_checked"] == summary["rows"]
    with pytest.raises(CacheMismatchError, match="'encoding' is 'int8' but the config wants 'fp16'"):
        FeatureCacheDataset(encoded["int8"], _cfg(world, **{"cache.encoding": "fp16"}))


def test_a_bad_int8_row_is_named(world, encoded, tmp_path):
    """int8 has no invalid values: a changed row shows in its checksum, and a token whose
    peak is not 127 (zeroed) in its values."""
    bad = tmp_path / "bad.h5"
    bad.write_bytes(encoded["int8"].read_bytes())
    cfg8 = _cfg(world, **{"cache.encoding": "int8"})
    with h5py.File(bad, "r+") as f:
        row = f["taps"][1]
        row[0, 3] = 0
        f["taps"][1] = row
    with pytest.raises(CacheError, match="bad.h5: row 1 differs from what was written"):
        verify_cache(bad, cfg8, progress=False)
    with h5py.File(bad, "r+") as f:
        f["checksum"][1] = row_checksum(f["taps"][1], f["global_token"][1])
    with pytest.raises(CacheError, match="bad.h5: row 1 taps has a token whose largest int8 value is 0"):
        verify_cache(bad, cfg8, progress=False)


# --- verification: every row when written, a sample when joined ---------------------------------


def test_every_row_is_verified_before_the_shard_is_renamed(world, tmp_path, monkeypatch):
    """A row that changes on disk after it was written stops the shard before it becomes one
    (the partial is kept, the shard never appears); a writer killed while verifying keeps
    its partial, and the rerun encodes nothing and verifies every row."""
    cfg, out = world["cfg"], tmp_path / "shard.h5"
    real_fill = cache_write._fill_shard

    def fill_then_flip(partial, *args):
        real_fill(partial, *args)
        with h5py.File(partial, "r+") as f:
            f["taps"][2] = -f["taps"][2]

    monkeypatch.setattr(cache_write, "_fill_shard", fill_then_flip)
    with pytest.raises(CacheError, match=r"shard.h5.partial: row 2 differs from what was written"):
        write_shard(cfg, "train", (0, 2), out, model=world["model"], progress=False, log=_quiet)
    assert not out.exists() and cache.partial_path(out).exists()
    cache.partial_path(out).unlink()
    monkeypatch.setattr(cache_write, "_fill_shard", real_fill)

    def killed(*_args):
        raise KeyboardInterrupt  # as a kill (SIGINT, a time limit) while verifying

    monkeypatch.setattr(cache_write, "check_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shard(cfg, "train", (0, 2), out, model=world["model"], progress=False, log=_quiet)
    assert not out.exists()
    with h5py.File(cache.partial_path(out)) as f:
        assert cache_write.done_prefix(f) == 4  # every row written and kept
    checked = []
    monkeypatch.setattr(cache_write, "check_rows",
                        lambda f, path, rows, on_rows=None: checked.extend(rows) or 0.0)

    class NoEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, _images):
            raise AssertionError("a rerun after the rows were written must not encode")

    logs = []
    write_shard(cfg, "train", (0, 2), out, model=NoEncoder(), progress=False, log=logs.append)
    assert checked == [0, 1, 2, 3] and any("resuming after 4/4 rows" in m for m in logs)
    with h5py.File(out) as f:
        assert f.attrs["complete"] and f.attrs["verified_rows"] == 4


def test_join_checks_a_sample_not_every_row(world, joined, tmp_path, monkeypatch, capsys):
    """The workflow's join (`cache-join`, then `cache-verify --sample`) reads the values of
    the sampled rows only: a row changed on disk outside the sample passes it, the full
    `cache-verify` finds it. Provenance, counts and layout are still checked in full."""
    from cascade_clip.cache import index as cache_index

    copies = []
    for s in joined["shards"]:
        copies.append(tmp_path / s.name)
        copies[-1].write_bytes(s.read_bytes())
    with h5py.File(copies[1], "r+") as f:  # rows 4..9 of the cache: 5 is its second row
        f["taps"][1] = f["taps"][0]
    index, cfg_path = tmp_path / "train.h5", str(world["cfg_path"])
    read = []
    real = cache_index.check_rows
    monkeypatch.setattr(cache_index, "check_rows",
                        lambda f, path, rows, on_rows=None: read.append((Path(path).name, list(rows)))
                        or real(f, path, rows, on_rows))
    assert cli_main(["cache-join", "--inputs", *map(str, copies), "--out", str(index)]) == 0
    assert read == []  # the join itself reads no row's values
    assert cli_main(["cache-verify", "--config", cfg_path, "--cache", str(index), "--sample", "2"]) == 0
    assert read == [("shard-0-of-2.h5", [0]), ("shard-1-of-2.h5", [5])]  # rows 0 and 9 of 10
    assert '"rows_checked": 2' in capsys.readouterr().out
    assert cli_main(["cache-verify", "--config", cfg_path, "--cache", str(index)]) == 2
    assert "shard-1-of-2.h5: row 1 differs from what was written" in capsys.readouterr().err
    # what the sample never skips: the config's provenance
    bad = ["cache-verify", "--config", cfg_path, "--set", "seed=4", "--cache", str(index), "--sample", "2"]
    assert cli_main(bad) == 2 and "'seed'" in capsys.readouterr().err


def test_cache_enabled_false_trains_from_images(world, joined):
    """`cache.enabled: false`: the frozen run's training items are augmented images (the
    encoder runs online), and a cache given anyway is refused by name."""
    from cascade_clip.errors import InputError
    from cascade_clip.train.inputs import build_train_dataset

    off = _cfg(world, **{"cache.enabled": False})
    items = build_train_dataset(off, "inductive", None)
    assert isinstance(items, SegmentationDataset) and items[0]["image"].shape == (3, 32, 32)
    with pytest.raises(InputError, match="train.h5: cache.enabled is false"):
        build_train_dataset(off, "inductive", joined["index"])
    assert isinstance(build_train_dataset(world["cfg"], "inductive", joined["index"]), FeatureCacheDataset)
