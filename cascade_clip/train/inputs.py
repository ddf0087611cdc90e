"""The training items and the loader: cached frozen features or augmented images, one endless
seeded stream shared by every rank (docs/design.md: Data protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cascade_clip.classes import config_unseen_names
from cascade_clip.config import Config
from cascade_clip.distributed import DistEnv, ShardedInfiniteSampler, loader_workers
from cascade_clip.errors import InputError


class SeededItems(torch.utils.data.Dataset):
    """Indexes a dataset with the sampler's (global position, index) pairs.

    The augmentation of an item is a function of (seed, epoch, index) in
    SegmentationDataset; the epoch is the stream position // dataset size. So every item
    looks the same whichever worker loads it, however many ranks share the stream, and
    whether or not the run was resumed.
    """

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        pos, index = key
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(pos // len(self.base))
        return self.base[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        # A batched read where the base has one (the feature cache) and no augmentation
        # depends on the epoch; otherwise item by item.
        if hasattr(self.base, "__getitems__") and not hasattr(self.base, "set_epoch"):
            return self.base.__getitems__([index for _, index in keys])
        return [self[key] for key in keys]


def cache_tap_rows(dataset: Any, blocks: list[int], where: str) -> list[int] | None:
    """Rows of the cached taps this model uses, or None when they are all used in order.

    A cache may hold more blocks than a model taps (the single-decoder baseline on the
    last block reads the main run's cache)."""
    cached = getattr(dataset, "blocks", None)
    if cached is None:
        return None
    cached = [int(b) for b in cached]
    missing = [b for b in blocks if b not in cached]
    if missing:
        raise InputError(f"{where}: cache holds blocks {cached}, the model taps {blocks} ({missing} missing)")
    rows = [cached.index(b) for b in blocks]
    return None if rows == list(range(len(cached))) else rows


def build_train_dataset(cfg: Config, setting: str, cache: str | Path | None) -> torch.utils.data.Dataset:
    """Cached frozen features (--cache) or images with the training augmentation (vpt, or
    frozen with `cache.enabled: false`: the frozen encoder runs every step)."""
    if cache is not None:
        if cfg.model.encoder_mode != "frozen":
            raise InputError(f"{cache}: a feature cache serves encoder_mode 'frozen' only, not 'vpt'")
        if not cfg.cache.enabled:
            raise InputError(f"{cache}: cache.enabled is false (train online from the images); "
                             "drop --cache or set cache.enabled: true")
        from cascade_clip.cache import FeatureCacheDataset

        return FeatureCacheDataset(cache, cfg, cfg.dataset.train_split, setting)
    from cascade_clip.data import SegmentationDataset
    from cascade_clip.data.transforms import train_transform

    return SegmentationDataset(
        cfg.dataset.root,
        cfg.dataset.train_split,
        unseen=config_unseen_names(cfg),
        mode=setting,
        transform=train_transform(cfg.train.augment),
        drop_unseen_images=cfg.dataset.drop_unseen_images,
        seed=training_seed(cfg),
    )


def training_seed(cfg: Config) -> int:
    """The seed of everything random in a training run (head init, sample order, dropout,
    online augmentation): train.seed, else the experiment seed. The world, the CLIP and the
    feature cache follow the experiment seed alone, so runs of several training seeds share
    them."""
    return cfg.seed if cfg.train.seed is None else cfg.train.seed


def make_loader(
    dataset: torch.utils.data.Dataset, cfg: Config, env: DistEnv, consumed: int, batch_size: int
) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's share, starting after `consumed` global items."""
    seed = training_seed(cfg)
    sampler = ShardedInfiniteSampler(len(dataset), env.rank, env.world_size, seed=seed, start=consumed)
    workers = loader_workers(cfg.train.num_workers)
    return torch.utils.data.DataLoader(
        SeededItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.train.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(training_seed(cfg)),  # keeps the global RNG untouched
    )
