"""`cascade-clip gpu-run`."""

from __future__ import annotations

import argparse

HELP = (
    "Run a command on N GPUs that no other concurrently running job of yours holds, taken from the "
    "inherited CUDA_VISIBLE_DEVICES (else all GPUs); sets CUDA_VISIBLE_DEVICES to exactly those."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, required=True, help="how many GPUs the command needs (0: none)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command and its arguments")


def run(args: argparse.Namespace) -> int:
    from cascade_clip.gpus import run_on_gpus

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_on_gpus(args.gpus, command)
