"""One module per `cascade-clip` subcommand (see cascade_clip/cli.py)."""
