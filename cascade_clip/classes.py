"""Which classes a run knows, which are unseen and which it queries.

Every stage asks the same questions of a config (docs/design.md: Data protocol): the cache
writer and the loaders hide unseen classes, training queries the seen ones (inductive) or all
(transductive, fully supervised), evaluation scores all. The answers live here, once. Their
text embeddings: cascade_clip.text_cache.text_embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade_clip.config import Config
from cascade_clip.data import IGNORE_INDEX, UNSEEN_INDEX

SETTINGS = ("inductive", "transductive", "fully_supervised")


def config_unseen_names(cfg: Config) -> list[str]:
    """The configured unseen class names: a list as given, or a registry split (the
    paper's when `dataset.unseen` is None, another by name)."""
    from cascade_clip.data.registry import unseen_class_names

    return unseen_class_names(cfg.dataset.name, cfg.dataset.unseen, cfg.dataset.root)


@dataclass(frozen=True)
class ClassSplit:
    """All classes of a dataset (train-id order), which are unseen, and which are queried.

    `queries[q]` is the train id that query (text embedding / logit channel) q stands for.
    """

    names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    queries: tuple[int, ...]

    @property
    def unseen_names(self) -> list[str]:
        return [self.names[i] for i in self.unseen]

    @property
    def unseen_queries(self) -> list[int]:
        """Query indices of the unseen classes (empty in the inductive setting)."""
        unseen = set(self.unseen)
        return [q for q, c in enumerate(self.queries) if c in unseen]

    def target_lut(self) -> torch.Tensor:
        """(256,) int64 lookup: label value -> query index; train ids that are not queried
        become 255 (ignore); 255 and 254 (unseen, to be pseudo-labelled) stay as they are."""
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
        lut[UNSEEN_INDEX] = UNSEEN_INDEX
        for q, c in enumerate(self.queries):
            lut[c] = q
        return lut


def class_split(cfg: Config, setting: str, names: tuple[str, ...] | None = None) -> ClassSplit:
    """Seen / unseen ids from the config's class names; queries by setting."""
    from cascade_clip.data import load_classes, resolve_split

    names = tuple(names) if names is not None else tuple(load_classes(cfg.dataset.root))
    seen, unseen = resolve_split(names, config_unseen_names(cfg))
    queries = seen if setting == "inductive" else list(range(len(names)))
    return ClassSplit(names, tuple(seen), tuple(unseen), tuple(queries))
