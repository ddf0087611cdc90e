"""Compares the packages installed in the running Python with requirements-lock.txt.

    python .ci/check_lock.py            exit 1 unless every locked package that applies here
                                        (its environment marker) is installed at its locked version
    python .ci/check_lock.py --report   print what differs from the lock, exit 0 (.ci/drift)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of every pin in `lock` whose marker holds in this Python."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        name, sep, version = requirement.partition("==")
        if not sep:
            raise SystemExit(f"{lock}: {line!r} is not a pin (name==version)")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", action="store_true", help="print the differences, never fail")
    args = parser.parse_args()
    locked, installed = locked_versions(), installed_versions()
    changed = {n: (v, installed[n]) for n, v in locked.items() if n in installed and installed[n] != v}
    missing = sorted(n for n in locked if n not in installed)
    ours = ("cascade-clip", "pip", "setuptools")  # the project itself and the venv's own tools
    unlocked = sorted(n for n in installed if n not in locked and n not in ours)
    for name, (want, have) in sorted(changed.items()):
        print(f"{name}: locked {want}, installed {have}")
    for name in missing:
        print(f"{name}: locked {locked[name]}, not installed")
    for name in unlocked:
        print(f"{name}: installed {installed[name]}, not in the lock")
    same = len(locked) - len(changed) - len(missing)
    print(f"{same} of {len(locked)} locked packages at their locked version ({LOCK.name})")
    if args.report:
        return 0
    return 1 if changed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
