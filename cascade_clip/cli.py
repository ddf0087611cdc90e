"""`cascade-clip`: one subcommand per workflow stage.

Each subcommand lives in `cascade_clip/commands/<name>.py` and exposes `HELP`,
`add_arguments(parser)` and `run(args) -> int`. Command modules import heavy libraries
(torch, open_clip, h5py) inside `run`, so `cascade-clip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cascade_clip.errors import CascadeClipError

# name -> module, in pipeline order (this is also the order `--help` lists them in).
COMMANDS = {
    "plan": "cascade_clip.commands.plan",
    "download": "cascade_clip.commands.download",
    "prepare": "cascade_clip.commands.prepare",
    "make-shapes": "cascade_clip.commands.make_shapes",
    "pretrain-clip": "cascade_clip.commands.pretrain_clip",
    "split": "cascade_clip.commands.split",
    "text-embeddings": "cascade_clip.commands.text_embeddings",
    "cache-features": "cascade_clip.commands.cache_features",
    "cache-join": "cascade_clip.commands.cache_join",
    "cache-verify": "cascade_clip.commands.cache_verify",
    "train": "cascade_clip.commands.train",
    "evaluate": "cascade_clip.commands.evaluate",
    "predict": "cascade_clip.commands.predict",
    "import-official": "cascade_clip.commands.import_official",
    "report": "cascade_clip.commands.report",
    "gpu-run": "cascade_clip.commands.gpu_run",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-clip",
        description="Cascade-CLIP zero-shot semantic segmentation: the workflow's stages.",
    )
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CascadeClipError as err:
        # Bad input (and other expected failures) in one line naming the file or key; any
        # other exception is a bug and keeps its traceback.
        print(f"cascade-clip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cascade-clip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
