"""`cascade-clip download`."""

from __future__ import annotations

import argparse
import sys

from cascade_clip.errors import InputError

HELP = "Download a real dataset's archives (resumable, checksummed) and extract them."

REAL_DATASETS = ("coco_stuff_164k", "voc12", "pascal_context_59", "voc21", "ade20k_150",
                 "pascal_context_459", "ade20k_847")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=REAL_DATASETS,
                        help="dataset to fetch (default: the config's dataset.name)")
    parser.add_argument("--root", default=None,
                        help="download folder; files go to ROOT/DATASET/ (default resources/downloads)")
    parser.add_argument("--base-url", default=None,
                        help="fetch every file from BASE_URL/<file name> instead of its own URL "
                             "(a mirror, or a local server in tests)")
    parser.add_argument("--sources", default=None,
                        help="sources YAML to use instead of the packaged cascade_clip/data/sources.yaml")
    parser.add_argument("--local", action="append", default=[], metavar="FILE=PATH",
                        help="use your copy of a file instead of downloading it (an archive that "
                             "needs a registration: ADE20K_2021_17_01.zip=/path/to/it); repeatable")
    parser.add_argument("--no-extract", action="store_true", help="download only")
    parser.add_argument("--retries", type=int, default=5, help="retries per file on transient errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--config", default=None, help="experiment YAML (optional): its dataset.name "
                        "and its `sources:` section (keys root, base_url, file) give defaults; "
                        "`sources: {sha256: {FILE NAME: DIGEST}}` pins the digest of a file the "
                        "sources list without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --config)")


def _pin(sources: dict[str, list[dict]], pins: dict, where: str) -> dict[str, list[dict]]:
    """Apply `sources.sha256` ({file name: digest}) of the config to the source entries."""
    if not isinstance(pins, dict):
        raise InputError(f"{where}: sources.sha256 must map file names to sha256 digests")
    known = {e["name"] for files in sources.values() for e in files}
    unknown = sorted(set(pins) - known)
    if unknown:
        raise InputError(f"{where}: sources.sha256 names {unknown}, which no dataset's sources list")
    return {ds: [dict(e, sha256=str(pins[e["name"]])) if e["name"] in pins else e for e in files]
            for ds, files in sources.items()}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade_clip.data.registry import download_folder
    from cascade_clip.download import DownloadError, fetch_dataset, load_sources, recorded_digest

    dataset, root, base_url, sources_file = args.dataset, args.root, args.base_url, args.sources
    pins, local = {}, {}
    if args.config:
        from cascade_clip.config import load_config, parse_overrides

        cfg = load_config(args.config, parse_overrides(args.overrides))
        section = cfg.extra.get("sources") or {}
        dataset = dataset or cfg.dataset.name
        root = root or section.get("root")
        base_url = base_url or section.get("base_url")
        sources_file = sources_file or section.get("file")
        pins = section.get("sha256") or {}
        local = dict(section.get("local") or {})
    for item in args.local:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--local {item!r}: expected FILE=PATH")
        local[name] = path
    if not dataset:
        raise InputError("no dataset given: pass --dataset NAME or --config FILE")
    if dataset not in REAL_DATASETS:
        raise InputError(f"dataset {dataset!r} is not downloaded; the shapes world is made by "
                         "`cascade-clip make-shapes`")
    sources = _pin(load_sources(sources_file), pins, args.config)
    folder = download_folder(dataset)  # voc21 reads voc12's download
    try:
        out = fetch_dataset(folder, root or "resources/downloads", sources=sources,
                            base_url=base_url, retries=args.retries, local=local,
                            unpack=not args.no_extract, progress=not args.no_progress)
    except DownloadError as err:
        print(f"cascade-clip download: error: {err}", file=sys.stderr)
        return 1
    print(f"{dataset}: downloaded to {out}")
    for entry in sources[folder]:
        if any(entry.get(k) for k in ("md5", "sha1", "sha256")):
            continue
        digest = recorded_digest(Path(out) / entry["name"])
        print(f"{entry['name']}: no published digest; sha256 {digest} was recorded at its first "
              f"download ({entry['name']}.sha256 beside it) and is checked on every later run. To pin it, "
              f"add to the experiment config:\n  sources:\n    sha256:\n      {entry['name']}: {digest}")
    return 0
