"""Evaluate a checkpoint (or frozen CLIP itself) on a validation split.

`evaluate()` reads top to bottom:

  1. join the process group (torchrun) or run alone;
  2. the dataset's classes and which are unseen (cross-dataset: none, every class seen);
  3. the model: CLIP + Cascade-CLIP with the checkpoint's weights, or, with
     `baseline="dense"`, frozen CLIP's own dense similarity (no decoder, no checkpoint);
  4. every image of this rank's share: eval transform (short side resize), sliding-window
     sigmoid scores, seen-class calibration (inductive only), resize to the label size,
     argmax, one confusion matrix;
  5. the confusion matrices summed over ranks; rank 0 writes the files.

Files in DIR:

  DIR/metrics.json   summarize() (miou, miou_seen, miou_unseen, hiou, per_class_iou under
                     absent_class_rule, and the means under each rule in
                     by_absent_class_rule: cascade_clip.metrics; NaN written as null)
                     + setting, split, dataset, checkpoint, baseline, num_images,
                     images_per_s, world_size; for VOC-21 the background protocol
                     (voc21_background) and its prompts
  DIR/per_class.csv  class, split (seen/unseen), iou, gt_pixels, pred_pixels
  DIR/examples/<id>.png  image | ground truth | prediction with a legend (unseen marked *)
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cascade_clip.checkpoint import check_checkpoint, load_checkpoint
from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config
from cascade_clip.distributed import DistEnv, all_reduce_max, all_reduce_sum, init_distributed, loader_workers
from cascade_clip.errors import InputError
from cascade_clip.inference import calibrate, class_scores, predict_labels, sliding_window_scores
from cascade_clip.metrics import confusion_matrix, summarize
from cascade_clip.model import CascadeCLIP, TappedEncoder, load_clip
from cascade_clip.text_cache import text_embeddings

BASELINES = ("dense",)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


class DenseCLIP(nn.Module):
    """Frozen CLIP's own dense prediction, no decoder: the last block's patch tokens through
    ln_post/proj, L2-normalised, cosine similarity with each class text embedding.

    forward(images (B, 3, H, W), text (K, C)) -> cosine (B, K, h, w) in [-1, 1]. The raw
    cosine is used as the logit: sigmoid is monotonic, so the argmax is CLIP's own, and
    overlapping windows average without saturating.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        depth = len(clip_model.visual.transformer.resblocks)
        self.encoder = TappedEncoder(clip_model.visual, blocks=[depth], mode="frozen")

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(images)
        tokens = feats.taps[0]  # (B, N, C), L2-normalised
        text = torch.nn.functional.normalize(text.to(tokens.dtype), dim=-1)
        cos = torch.einsum("bnc,kc->bkn", tokens, text)
        return cos.reshape(cos.shape[0], cos.shape[1], *feats.grid)


def load_model(
    cfg: Config, checkpoint: str | Path | None, baseline: str | None, device: torch.device
) -> tuple[nn.Module, nn.Module, Any, dict[str, Any] | None]:
    """(segmenter, clip, tokenizer, checkpoint state or None), the segmenter in eval mode."""
    if baseline is not None and baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if baseline is None and checkpoint is None:
        raise InputError("a checkpoint is needed (or --baseline dense for frozen CLIP alone)")
    state = None
    if baseline is None:
        state = load_checkpoint(checkpoint)
        check_checkpoint(state, cfg, checkpoint)
    clip, tokenizer = load_clip(cfg.clip)
    clip.to(device)
    if baseline == "dense":
        model: nn.Module = DenseCLIP(clip)
    else:
        model = CascadeCLIP(clip, cfg.model)
        model.load_trainable_state_dict(state["model"])
    return model.to(device).eval(), clip, tokenizer, state


def make_logits_fn(
    model: nn.Module, text: torch.Tensor, amp: bool, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """window (b, 3, crop, crop) -> logits (b, K, h, w) fp32."""

    def logits_fn(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model(window, text).float()

    return logits_fn


# ------------------------------------------------------------------------------------------
# Colours and figures (shared with cascade_clip.predict)
# ------------------------------------------------------------------------------------------


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 distinct colours, fixed for a given class count (golden-ratio
    hues, alternating lightness); ignore (255) is drawn black by `colorize`."""
    import colorsys

    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        hue = (k * 0.618033988749895) % 1.0
        light = (0.45, 0.6, 0.35)[k % 3]
        out[k] = np.round(np.array(colorsys.hls_to_rgb(hue, light, 0.75)) * 255)
    return out


def colorize(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids (255 = ignore) -> (H, W, 3) uint8."""
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = label < len(colours)
    out[valid] = colours[label[valid]]
    return out


def legend_handles(ids: Sequence[int], names: Sequence[str], colours: np.ndarray, unseen: set[int]) -> list:
    """Matplotlib legend patches for `ids`; unseen classes are starred."""
    from matplotlib.patches import Patch

    return [
        Patch(
            facecolor=colours[i] / 255.0, edgecolor="black", label=f"{names[i]}{' *' if i in unseen else ''}"
        )
        for i in ids
    ]


def save_example(
    path: Path,
    image: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray]],
    names: Sequence[str],
    unseen: set[int],
    title: str = "",
) -> None:
    """image (H, W, 3) uint8 | one colourised panel per (title, label (H, W)), with a legend
    of the classes that appear in any panel (unseen starred)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = palette(len(names))
    present = sorted({int(v) for _, lab in panels for v in np.unique(lab) if v < len(names)})
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.2 * (1 + len(panels)) + 2.2, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, (panel_title, lab) in zip(axes[1:], panels):
        ax.imshow(colorize(lab, colours), interpolation="nearest")
        ax.set_title(panel_title)
    for ax in axes:
        ax.axis("off")
    handles = legend_handles(present, names, colours, unseen)
    if handles:
        fig.legend(
            handles=handles,
            loc="center right",
            fontsize=8,
            title="* unseen" if unseen & set(present) else None,
            ncol=max(1, math.ceil(len(handles) / 18)),
        )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def write_per_class(
    path: Path, confusion: np.ndarray, metrics: dict[str, Any], unseen: Sequence[str]
) -> None:
    unseen_set = set(unseen)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "split", "iou", "gt_pixels", "pred_pixels"])
        for i, (name, iou) in enumerate(metrics["per_class_iou"].items()):
            writer.writerow(
                [
                    name,
                    "unseen" if name in unseen_set else "seen",
                    "" if math.isnan(iou) else f"{iou:.4f}",
                    int(confusion[i].sum()),
                    int(confusion[:, i].sum()),
                ]
            )


def first_item(items: list[Any]) -> Any:
    """Collate for batch size 1 with images of different sizes: the item itself."""
    return items[0]


# ------------------------------------------------------------------------------------------
# The evaluation run
# ------------------------------------------------------------------------------------------


def evaluate(
    cfg: Config,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    text: str | Path | None = None,
    baseline: str | None = None,
    cross_dataset: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate and (on rank 0) write metrics.json, per_class.csv, confusion.npy and examples/; returns
    the metrics dict on every rank.

    `cross_dataset=True`: the config names another dataset than the model was trained on;
    every class of it is treated as seen.
    """
    out_dir = Path(out_dir)
    split = split or cfg.evaluate.split or cfg.dataset.val_split

    # 1. processes
    env: DistEnv = init_distributed(device)

    # 2. classes; calibration lowers the seen classes' scores in the inductive setting only
    from cascade_clip.data import SegmentationDataset, load_classes
    from cascade_clip.data.transforms import eval_transform

    names = tuple(load_classes(cfg.dataset.root))
    unseen_names = [] if cross_dataset else config_unseen_names(cfg)
    unseen_ids = {names.index(n) for n in unseen_names if n in names}
    if len(unseen_ids) != len(set(unseen_names)):
        missing = sorted(set(unseen_names) - set(names))
        raise InputError(f"{cfg.dataset.root}: unseen class(es) {missing} are not classes of the dataset")
    seen_ids = [i for i in range(len(names)) if i not in unseen_ids]

    # 3. model and class text embeddings (every class is a query at evaluation)
    if cfg.evaluate.crop_size != cfg.clip.image_size:
        raise InputError(
            f"evaluate.crop_size {cfg.evaluate.crop_size} must equal clip.image_size {cfg.clip.image_size}"
        )
    model, clip, tokenizer, state = load_model(cfg, checkpoint, baseline, env.device)
    if state is not None and not cross_dataset:
        check_checkpoint(state, cfg, checkpoint, names, unseen_names)
    # The setting is the checkpoint's own (a self-trained model gets no seen calibration,
    # whatever the config says).
    if baseline is not None:
        setting = f"frozen CLIP ({baseline})"
    elif cross_dataset:
        setting = "cross-dataset"
    else:
        setting = state.get("setting", cfg.train.setting)
    calibration = cfg.model.seen_calibration if setting == "inductive" else 0.0
    # each class's prompts (several for VOC-21's background: evaluate.voc21_background)
    from cascade_clip.data.registry import class_prompts

    prompts = class_prompts(cfg.dataset.name, names, cfg.evaluate.voc21_background)
    groups, flat = [], []
    for ps in prompts:
        groups.append(list(range(len(flat), len(flat) + len(ps))))
        flat.extend(ps)
    queries = text_embeddings(cfg, tuple(flat), text, clip, tokenizer, env.device)  # (Q, C)
    amp = cfg.train.amp and env.device.type == "cuda"
    logits_fn = make_logits_fn(model, queries, amp, env.device)

    # 4. this rank's share of the images
    dataset = SegmentationDataset(
        cfg.dataset.root, split, mode="eval", transform=eval_transform(cfg.evaluate.short_side)
    )
    share = list(range(env.rank, len(dataset), env.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, share),
        batch_size=1,
        num_workers=loader_workers(cfg.train.num_workers),
        collate_fn=first_item,
    )
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    examples: list[tuple[int, str, np.ndarray, np.ndarray]] = []
    t0 = time.time()
    for item in tqdm(loader, total=len(share), disable=not env.is_main, desc=f"evaluate {split}"):
        image = item["image"].unsqueeze(0).to(env.device)  # (1, 3, h, w) eval size
        label = item["label"]  # (H, W) original size, train ids / 255
        scores = sliding_window_scores(
            logits_fn, image, len(flat), cfg.evaluate.crop_size, cfg.evaluate.stride
        )  # (1, Q, h, w)
        scores = class_scores(scores, groups)  # (1, K, h, w): a class's maximum over its prompts
        scores = calibrate(scores, seen_ids, calibration)
        pred = predict_labels(scores, tuple(label.shape))[0].cpu()  # (H, W)
        confusion += confusion_matrix(pred, label, len(names), dataset.ignore_index)
        if env.is_main and len(examples) < cfg.evaluate.num_visualize:
            examples.append((int(item["index"]), item["id"], label.numpy(), pred.numpy()))
    seconds = time.time() - t0

    # 5. one confusion matrix over the whole split
    confusion = all_reduce_sum(torch.from_numpy(confusion).to(env.device)).cpu().numpy()
    num_images = int(all_reduce_sum(torch.tensor(len(share), device=env.device)).item())
    seconds = float(all_reduce_max(torch.tensor(seconds, device=env.device)).item())  # wall time
    metrics = summarize(confusion, names, unseen_names)
    metrics.update(
        {
            "setting": setting,
            "split": split,
            "dataset": cfg.dataset.name,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_step": None if state is None else state.get("step"),
            "baseline": baseline,
            "seen_calibration": calibration,
            "num_images": num_images,
            "images_per_s": num_images / max(seconds, 1e-9),
            "world_size": env.world_size,
        }
    )
    if cfg.dataset.name == "voc21":  # the background protocol, named (report: open_vocab)
        metrics["voc21_background"] = cfg.evaluate.voc21_background
        metrics["background_prompts"] = list(prompts[0])
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
        write_per_class(out_dir / "per_class.csv", confusion, metrics, unseen_names)
        np.save(out_dir / "confusion.npy", confusion)  # (K, K): rows ground truth, columns prediction
        (out_dir / "examples").mkdir(exist_ok=True)
        for index, image_id, label, pred in examples:
            image, _ = dataset.load_raw(index)
            save_example(
                out_dir / "examples" / f"{image_id}.png",
                image,
                [("ground truth", label), ("prediction", pred)],
                names,
                unseen_ids,
                title=f"{image_id} ({setting})",
            )
    return metrics
