"""Dataset registry: class names in train-id order, the zero-shot split, the template set.

Train id `i` of a dataset is `spec.classes[i]`; label PNGs on disk hold these ids, 255 =
ignore (docs/design.md: Data and the zero-shot protocol). Splits are always given as class
*names*; `resolve_split` turns them into ids and refuses a name the dataset does not have.

The "shapes" world is generated in the pipeline (cascade_clip.data.shapes); its class list
is read from the generator module when asked for, or from a generated dataset's
`dataset.json` through `load_classes(root)` / `get_spec("shapes", root)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cascade_clip.errors import InputError, MissingInputError

MAX_CLASSES = 65534  # 16-bit labels, 65535 = ignore (cascade_clip.data: label_ignore_index)

# --- COCO-Stuff 164k ----------------------------------------------------------------
# The stuffthingmaps PNGs hold 0-based ids 0..181 (= COCO-Stuff's 1-based label id - 1,
# nightrome/cocostuff labels.txt) and 255 = unlabeled. Ids 0..90 are COCO's 91 thing ids
# (11 of which never received masks), 91..181 the 91 stuff classes.
COCO_STUFF_182: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "mirror", "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff, 0-based 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)  # fmt: skip
# The 11 COCO thing ids without segmentation masks (0-based): street sign, hat, shoe,
# eye glasses, plate, mirror, window, desk, door, blender, hair brush.
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_171: tuple[str, ...] = tuple(
    name for i, name in enumerate(COCO_STUFF_182) if i not in COCO_STUFF_UNUSED_IDS
)

# --- PASCAL VOC 2012 (+SBD aug): 20 classes, background dropped ----------------------
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# --- PASCAL Context 59 ----------------------------------------------------------------
# Name and category id in the Detail API's 459-class scheme (trainval_merged.json's
# `category_id`, 1-based index into PASCAL Context's alphabetical labels.txt). Sorted by
# id, which is also alphabetical order: the standard 59-class list.
CONTEXT_59_DETAIL_IDS: tuple[tuple[str, int], ...] = (
    ("aeroplane", 2), ("bag", 9), ("bed", 18), ("bedclothes", 19), ("bench", 22),
    ("bicycle", 23), ("bird", 25), ("boat", 31), ("book", 33), ("bottle", 34),
    ("building", 44), ("bus", 45), ("cabinet", 46), ("car", 59), ("cat", 65),
    ("ceiling", 68), ("chair", 72), ("cloth", 80), ("computer", 85), ("cow", 98),
    ("cup", 104), ("curtain", 105), ("dog", 113), ("door", 115), ("fence", 144),
    ("floor", 158), ("flower", 159), ("food", 162), ("grass", 187), ("ground", 189),
    ("horse", 207), ("keyboard", 220), ("light", 232), ("motorbike", 258),
    ("mountain", 259), ("mouse", 260), ("person", 284), ("plate", 295), ("platform", 296),
    ("pottedplant", 308), ("road", 324), ("rock", 326), ("sheep", 347), ("shelves", 349),
    ("sidewalk", 354), ("sign", 355), ("sky", 360), ("snow", 366), ("sofa", 368),
    ("table", 397), ("track", 415), ("train", 416), ("tree", 420), ("truck", 424),
    ("tvmonitor", 427), ("wall", 440), ("water", 445), ("window", 454), ("wood", 458),
)  # fmt: skip
CONTEXT_59: tuple[str, ...] = tuple(name for name, _ in CONTEXT_59_DETAIL_IDS)


# --- the open-vocabulary suite (cross-dataset targets) ---------------------------------
# Long class lists live in cascade_clip/data/classes/, one class per line in train-id order,
# each file citing where its names come from; `#` lines are comments.


def _class_file(file_name: str) -> list[str]:
    from importlib.resources import files

    text = files("cascade_clip.data").joinpath("classes", file_name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# PASCAL VOC 2012 with background (VOC-21): VOC's own indices 0..20, background first, as
# MMSegmentation's PascalVOCDataset (CAT-Seg's voc20b puts background last; the order
# changes no score). How background is prompted is a protocol of its own (class_prompts).
VOC_21: tuple[str, ...] = ("background", *VOC_CLASSES)


def _background_protocols() -> dict[str, tuple[str, ...]]:
    from importlib.resources import files

    import yaml

    text = files("cascade_clip.data").joinpath("classes", "voc21_background.yaml").read_text(encoding="utf-8")
    return {name: tuple(dict.fromkeys(prompts)) for name, prompts in yaml.safe_load(text).items()}


# VOC-21's background protocols (evaluate.voc21_background): the prompts background is scored
# with, each peer's (classes/voc21_background.yaml cites them); repeats dropped.
VOC21_BACKGROUND: dict[str, tuple[str, ...]] = _background_protocols()
VOC21_BACKGROUND_LABELS = {"catseg": "CAT-Seg's (background = max over 39 Context names)",
                           "fcclip": "FC-CLIP's (background = max over its stuff synonyms)",
                           "word": "one word (\"background\")"}


def class_prompts(name: str, classes: Sequence[str], voc21_background: str = "catseg"
                  ) -> list[tuple[str, ...]]:
    """The prompt names each class of dataset `name` is scored with, in class order: its own
    name, except VOC-21's background, which takes the protocol's prompts (the class then
    scores the maximum over them)."""
    prompts = [(c,) for c in classes]
    if name == "voc21" and classes and classes[0] == "background":
        if voc21_background not in VOC21_BACKGROUND:
            raise InputError(f"evaluate.voc21_background: {voc21_background!r} is not one of "
                             f"{sorted(VOC21_BACKGROUND)}")
        prompts[0] = VOC21_BACKGROUND[voc21_background]
    return prompts
# ADE20K-150: annotation value v -> train id v - 1, 0 ignored.
ADE20K_150: tuple[str, ...] = tuple(_class_file("ade20k_150.txt"))
# PASCAL Context-459: PASCAL-Context's `trainval/<id>.mat` LabelMap value c (1..459, the line of
# its labels.txt) -> train id c - 1, unlabeled (0) ignored; Detail's category ids are the same.
CONTEXT_459: tuple[str, ...] = tuple(_class_file("pascal_context_459.txt"))
# ADE20K-847: (ADE20K object class index, name) in train-id order.
ADE20K_847_IDS: tuple[tuple[int, str], ...] = tuple(
    (int(index), name) for index, name in (line.split("\t", 1) for line in _class_file("ade20k_847.tsv"))
)
ADE20K_847: tuple[str, ...] = tuple(name for _, name in ADE20K_847_IDS)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's classes (train-id order), default unseen names and template set."""

    name: str
    classes: tuple[str, ...]
    unseen: tuple[str, ...]
    templates: str
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class _ShapesSpec:
    """The shapes world's spec; classes come from the generator module on first use.

    `cascade_clip.data.shapes` is written by the shapes generator; it is imported only when
    `.classes` or `.unseen` is read, so the registry imports without it. For a generated
    dataset prefer `get_spec("shapes", root)`, which reads `<root>/dataset.json`.
    """

    name: str = "shapes"
    templates: str = "shapes"
    description: str = "procedurally generated demo world (docs/design.md: The shapes world)"

    def _module_attr(self, candidates: Sequence[str]) -> tuple[str, ...]:
        try:
            from cascade_clip.data import shapes
        except ImportError as err:  # pragma: no cover - depends on the generator
            raise InputError(
                f"shapes: class list unavailable ({err}); read it from a generated "
                "dataset with load_classes(root) or get_spec('shapes', root)"
            ) from None
        for attr in candidates:
            value = getattr(shapes, attr, None)
            if value is not None:
                return tuple(str(v) for v in value)
        raise InputError(f"shapes: cascade_clip.data.shapes defines none of {list(candidates)}")

    @property
    def classes(self) -> tuple[str, ...]:
        return self._module_attr(("CLASSES", "CLASS_NAMES", "SHAPES_CLASSES"))

    @property
    def unseen(self) -> tuple[str, ...]:
        return self._module_attr(("UNSEEN", "UNSEEN_CLASSES", "SHAPES_UNSEEN"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetSpec | _ShapesSpec] = {
    "coco_stuff_164k": DatasetSpec(
        name="coco_stuff_164k",
        classes=COCO_STUFF_171,
        unseen=(
            "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
            "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree",
            "wall-concrete",
        ),  # fmt: skip
        templates="official-multi",
        description="COCO-Stuff 164k: 171 classes, 118,287 train / 5,000 val",
    ),
    "voc12": DatasetSpec(
        name="voc12",
        classes=VOC_CLASSES,
        unseen=("pottedplant", "sheep", "sofa", "train", "tvmonitor"),
        templates="official-single",
        description="PASCAL VOC 2012 + SBD aug: 20 classes, 10,582 train / 1,449 val",
    ),
    "pascal_context_59": DatasetSpec(
        name="pascal_context_59",
        classes=CONTEXT_59,
        unseen=(
            "aeroplane", "bird", "boat", "cat", "cow", "motorbike", "sofa", "tvmonitor",
            "fence", "keyboard",
        ),  # fmt: skip
        templates="official-multi",
        description="PASCAL Context 59: 59 classes, 4,996 train / 5,104 val",
    ),
    # Cross-dataset targets of the open-vocabulary suite (OPEN_VOCAB_SUITE): every class
    # seen, so no unseen split of their own.
    "voc21": DatasetSpec(
        name="voc21",
        classes=VOC_21,
        unseen=(),
        templates="official-single",
        description="PASCAL VOC 2012 with background: 21 classes, 10,582 train / 1,449 val "
                    "(read from voc12's download)",
    ),
    "ade20k_150": DatasetSpec(
        name="ade20k_150",
        classes=ADE20K_150,
        unseen=(),
        templates="official-multi",
        description="ADE20K-150 (ADEChallengeData2016): 150 classes, 20,210 train / 2,000 val",
    ),
    "pascal_context_459": DatasetSpec(
        name="pascal_context_459",
        classes=CONTEXT_459,
        unseen=(),
        templates="official-multi",
        description="PASCAL Context-459: 459 classes, 5,104 val, 16-bit labels (PASCAL-Context's "
                    "trainval.tar.gz; images and val list from pascal_context_59's download)",
    ),
    "ade20k_847": DatasetSpec(
        name="ade20k_847",
        classes=ADE20K_847,
        unseen=(),
        templates="official-multi",
        description="ADE20K-847 (ADE20K_2021_17_01, registration needed): 847 classes, "
                    "2,000 val, 16-bit labels",
    ),
    "shapes": _ShapesSpec(),
}

# Datasets converted from another dataset's download (`cascade-clip download` fetches, and
# `prepare` reads, <downloads>/<that dataset>/).
DOWNLOAD_OF: dict[str, str] = {"voc21": "voc12"}
# Datasets whose conversion reads, beside their own download, other datasets' downloads:
# Context-459's labels are its own archive, its images and val list Context-59's.
ALSO_READS: dict[str, tuple[str, ...]] = {"pascal_context_459": ("pascal_context_59",)}

# The open-vocabulary suite a COCO-Stuff model is judged on (workflow.open_vocab).
OPEN_VOCAB_SUITE: tuple[str, ...] = (
    "ade20k_150", "ade20k_847", "pascal_context_459", "pascal_context_59", "voc12", "voc21",
)


def download_folder(name: str) -> str:
    """The download `name` is converted from: its own, or DOWNLOAD_OF's."""
    return DOWNLOAD_OF.get(name, name)


def download_folders(name: str) -> list[str]:
    """Every download `name`'s conversion reads: its own (download_folder) and ALSO_READS'."""
    return [download_folder(name), *ALSO_READS.get(name, ())]


def cross_eval_targets(config: dict) -> dict[str, str]:
    """{dataset: data root} of every cross-dataset target of a raw config: its `cross_eval`
    list and, with `workflow.open_vocab`, every dataset of OPEN_VOCAB_SUITE not listed there,
    prepared beside the main dataset (<parent of dataset.root>/<name>). The main dataset
    itself is never a cross target."""
    main = config["dataset"]["name"]
    targets = {c["dataset"]: c["root"] for c in config.get("cross_eval") or []}
    if (config.get("workflow") or {}).get("open_vocab"):
        parent = Path(config["dataset"]["root"]).parent
        for name in OPEN_VOCAB_SUITE:
            if name != main:
                targets.setdefault(name, str(parent / name))
    return targets


# Other zero-shot splits by name (`dataset.unseen: <name>`); None/absent = the paper's.
# The authors' released Context config indexes the alphabetical class list with the
# paper's ids, so the released Context model holds out these ten, not the paper's: offered
# to compare against that checkpoint, never the default.
NAMED_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "pascal_context_59": {
        "official-release": (
            "aeroplane", "bed", "bedclothes", "boat", "bottle", "car", "cloth", "cow",
            "keyboard", "plate",
        ),  # fmt: skip
    },
}
PAPER_SPLIT = "paper"


def unseen_class_names(
    name: str, unseen: Sequence[str] | str | None, root: str | Path | None = None
) -> list[str]:
    """The unseen class names a config means: a list as given; None or "paper" for the
    registry's (the paper's) split; another string names a split of NAMED_SPLITS."""
    if unseen is None or unseen == PAPER_SPLIT:
        if name not in DATASETS:
            raise InputError(
                f"dataset.unseen: {name} is not a registry dataset and has no split of its own; "
                "list the classes to hold out by name (dataset.unseen: [name, ...])"
            )
        if root is not None and not (Path(root) / "dataset.json").is_file():
            root = None
        return list(get_spec(name, root).unseen)
    if isinstance(unseen, str):
        splits = NAMED_SPLITS.get(name, {})
        if unseen not in splits:
            raise InputError(
                f"dataset.unseen: {name} has no split named {unseen!r}; "
                f"known: {[PAPER_SPLIT, *splits]} (or a list of class names)"
            )
        return list(splits[unseen])
    return [str(n) for n in unseen]


def check_unseen_names(
    name: str,
    unseen: Sequence[str] | str | None,
    classes: Sequence[str] | None = None,
    where: str = "config",
    root: str | Path | None = None,
) -> list[str]:
    """The unseen class names a config's `dataset.unseen` means (see `unseen_class_names`),
    each checked against the dataset's classes: `classes` (a prepared dataset's), else the
    registry's list. A name that is not a class raises InputError naming `where`, the key
    and the name, before anything reads images (`cascade-clip split`; the workflow checks a
    registry dataset's names when it starts, before the download)."""
    names = unseen_class_names(name, unseen, root)
    known = list(classes) if classes is not None else list(get_spec(name).classes)
    unknown = [n for n in names if n not in known]
    if unknown:
        what = "is not a class" if len(unknown) == 1 else "are not classes"
        raise InputError(f"{where}: dataset.unseen: {unknown} {what} of {name}; its classes: {known}")
    return names


def dataset_template_set(name: str) -> str:
    """The template set the release uses for dataset `name`."""
    if name not in DATASETS:
        raise InputError(
            f"clip.templates: 'dataset' has no template set for dataset {name!r} "
            f"(known: {sorted(DATASETS)}); name a set, e.g. official-multi, or list your own "
            "templates, e.g. [\"a photo of a {}.\"]"
        )
    return _spec(name).templates


def _spec(name: str) -> DatasetSpec | _ShapesSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise InputError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


def read_dataset_json(root: str | Path) -> dict:
    """Parse and check `<root>/dataset.json` (name, classes, image_suffix, label_suffix)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise MissingInputError(f"{path}: dataset.json not found (is {root} a prepared dataset?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: top level must be an object")
    missing = [k for k in ("name", "classes", "image_suffix", "label_suffix") if k not in meta]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{path}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise InputError(f"{path}: 'classes' repeats a name")
    if len(classes) > MAX_CLASSES:
        raise InputError(f"{path}: {len(classes)} classes; at most {MAX_CLASSES} fit a 16-bit label")
    return meta


def load_classes(root: str | Path) -> tuple[str, ...]:
    """Class names in train-id order from `<root>/dataset.json` (any dataset)."""
    return tuple(read_dataset_json(root)["classes"])


def get_spec(name: str, root: str | Path | None = None) -> DatasetSpec:
    """The registry spec of `name` as a plain DatasetSpec.

    For "shapes" with `root` the classes come from `<root>/dataset.json` (and the unseen
    names from its optional "unseen" key, else from the generator module). For a real
    dataset with `root`, the dataset.json classes must equal the registry's. A name the
    registry lacks is your own dataset: with `root`, its classes come from dataset.json
    (which must carry the same name) and it has no unseen split of its own.
    """
    if name not in DATASETS and root is not None:
        meta = read_dataset_json(root)
        if meta["name"] != name:
            raise InputError(f"{Path(root) / 'dataset.json'}: holds dataset {meta['name']!r}, the "
                             f"config names {name!r} (dataset.name / dataset.root)")
        return DatasetSpec(name, tuple(meta["classes"]), (), "", f"your own dataset in {root}")
    spec = _spec(name)
    if root is None:
        return DatasetSpec(spec.name, tuple(spec.classes), tuple(spec.unseen), spec.templates,
                           spec.description)
    meta = read_dataset_json(root)
    classes = tuple(meta["classes"])
    if name == "shapes":
        unseen = tuple(meta["unseen"]) if "unseen" in meta else tuple(spec.unseen)
        return DatasetSpec(name, classes, unseen, spec.templates, spec.description)
    if classes != tuple(spec.classes):
        raise InputError(
            f"{Path(root) / 'dataset.json'}: classes differ from the registry's {name} list"
        )
    return DatasetSpec(name, classes, tuple(spec.unseen), spec.templates, spec.description)


def resolve_split(
    spec_or_classes: DatasetSpec | _ShapesSpec | Sequence[str],
    unseen_names: Iterable[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Class names -> (seen_ids, unseen_ids), both sorted train ids.

    `spec_or_classes` is a spec or a class list in train-id order; `unseen_names` None means
    the spec's own unseen list. A name that is not a class raises ValueError naming it.
    """
    if isinstance(spec_or_classes, (DatasetSpec, _ShapesSpec)):
        classes = tuple(spec_or_classes.classes)
        where = spec_or_classes.name
        if unseen_names is None:
            unseen_names = spec_or_classes.unseen
    else:
        classes = tuple(spec_or_classes)
        where = "the class list"
        if unseen_names is None:
            raise InputError("resolve_split: unseen_names is required with a bare class list")
    if isinstance(unseen_names, str):
        raise InputError(f"unseen names must be a list of class names, got the string {unseen_names!r}")
    index = {name: i for i, name in enumerate(classes)}
    names = list(unseen_names)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise InputError(f"unknown class name(s) {unknown} for {where}; known: {list(classes)}")
    unseen = sorted({index[n] for n in names})
    seen = [i for i in range(len(classes)) if i not in set(unseen)]
    return seen, unseen
