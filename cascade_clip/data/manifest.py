"""Content manifests of a prepared dataset: every file with its sha256, one manifest per split.

`prepare` (and `make-shapes`) hash every file of the dataset they wrote, once, and write

    <root>/manifests/<split>.sha256     "<sha256 hex>  <path relative to root>" per line,
                                        sorted by path (the format of `sha256sum`, so
                                        `cd ROOT && sha256sum -c manifests/train.sha256`
                                        checks a split with the standard tool)

A split's manifest holds the files that split reads: `images/<split>/...`,
`labels/<split>/...`, `splits/<split>.*`, `captions/<split>.*`, and the files no split owns
(`dataset.json`), which every split reads. The manifest's own sha256 (`SplitManifest.digest`)
names the split's content: later stages key on it (the feature cache's provenance, a run's
inputs, the workflow's rule inputs), so a change of any byte a split reads changes exactly
the digests of the splits that read it, and never a digest of a split that does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cascade_clip.errors import InputError, MissingInputError

MANIFEST_DIR = "manifests"
MANIFEST_SUFFIX = ".sha256"
_SPLIT_FOLDERS = ("images", "labels")  # <folder>/<split>/... belongs to <split>
_SPLIT_FILES = ("splits", "captions")  # <folder>/<split>.<ext> belongs to <split>


def manifest_path(root: str | Path, split: str) -> Path:
    """`<root>/manifests/<split>.sha256`."""
    return Path(root) / MANIFEST_DIR / f"{split}{MANIFEST_SUFFIX}"


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _split_of(rel: str) -> str | None:
    """The split a dataset file belongs to, or None for a file every split reads."""
    parts = rel.split("/")
    if parts[0] in _SPLIT_FOLDERS and len(parts) > 2:
        return parts[1]
    if parts[0] in _SPLIT_FILES and len(parts) == 2:
        return parts[1].split(".", 1)[0]
    return None


def dataset_splits(root: str | Path) -> list[str]:
    """The splits of a prepared dataset: the names of its `splits/<split>.txt` lists."""
    return sorted(p.name[: -len(".txt")] for p in (Path(root) / "splits").glob("*.txt"))


def dataset_files(root: str | Path) -> list[str]:
    """Every file of the dataset folder as a POSIX path relative to it, sorted (the
    manifests' own folder left out). A name a manifest line cannot hold is refused."""
    root = Path(root)
    found = []
    for folder, dirs, names in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder == Path("."):
            dirs[:] = [d for d in dirs if d != MANIFEST_DIR]
        for name in names:
            rel = (rel_folder / name).as_posix()
            if "\n" in rel or "\\" in rel:
                raise InputError(f"{root / rel}: a file name with a newline or backslash cannot "
                                 "enter the dataset's manifest; rename it")
            found.append(rel)
    return sorted(found)


def hash_files(root: str | Path, files: Iterable[str], workers: int | None = None,
               progress: bool = True, desc: str = "hashing") -> dict[str, str]:
    """{relative path: sha256} of files under `root`, read in parallel threads (hashlib
    releases the GIL on large buffers), with a progress bar unless `progress` is false."""
    root = Path(root)
    files = list(files)
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(lambda rel: file_sha256(root / rel), files)
        bar = tqdm(digests, total=len(files), desc=desc, unit="file", disable=not progress,
                   mininterval=1.0)
        return dict(zip(files, bar))


def format_manifest(digests: Mapping[str, str]) -> str:
    """The `sha256sum` text of {path: sha256}, sorted by path."""
    return "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifests(root: str | Path, workers: int | None = None,
                    progress: bool = True) -> dict[str, str]:
    """Hash every file of the dataset at `root` once and write one manifest per split
    (`manifests/<split>.sha256`, each synced and renamed into place). Returns
    {split: manifest digest}. Every split needs its list, `splits/<split>.txt`."""
    root = Path(root)
    splits = dataset_splits(root)
    if not splits:
        raise MissingInputError(f"{root / 'splits'}: no split list (splits/<split>.txt); "
                                "not a prepared dataset")
    files = dataset_files(root)
    owners = {rel: _split_of(rel) for rel in files}
    strays = sorted({s for s in owners.values() if s is not None} - set(splits))
    if strays:
        raise InputError(f"{root}: files of split(s) {strays} but no splits/<split>.txt for them")
    digests = hash_files(root, files, workers, progress, desc=f"manifest {root.name}")
    out = {}
    for split in splits:
        text = format_manifest({rel: d for rel, d in digests.items() if owners[rel] in (None, split)})
        _write_atomic(manifest_path(root, split), text)
        out[split] = hashlib.sha256(text.encode()).hexdigest()
    return out


@dataclass(frozen=True)
class SplitManifest:
    """One split's manifest as read from disk: `files` maps each path (relative to `root`) to
    its sha256; `digest` is the sha256 of the manifest file, the split's content digest."""

    root: Path
    split: str
    files: Mapping[str, str]
    digest: str

    @property
    def path(self) -> Path:
        return manifest_path(self.root, self.split)

    def sha256(self, path: str | Path) -> str:
        """The recorded sha256 of a file of the split (a path under `root`, or relative)."""
        rel = Path(path)
        rel = (rel.relative_to(self.root) if rel.is_absolute() else rel).as_posix()
        try:
            return self.files[rel]
        except KeyError:
            raise InputError(f"{self.root / rel}: not in {self.path} (the dataset changed "
                             "after it was prepared? prepare it again)") from None

    def verify(self, path: str | Path, data: bytes | None = None) -> None:
        """Raise InputError naming the file when its bytes (`data`, else read from disk)
        differ from the manifest."""
        want = self.sha256(path)
        full = self.root / path if not Path(path).is_absolute() else Path(path)
        got = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(full)
        if got != want:
            raise InputError(f"{full}: content differs from {self.path} (sha256 {got[:12]}..., "
                             f"recorded {want[:12]}...); the dataset changed after it was "
                             "prepared: prepare it again")


def read_manifest(root: str | Path, split: str) -> SplitManifest:
    """A split's manifest; a missing or malformed one is a one-line error naming it."""
    root = Path(root)
    path = manifest_path(root, split)
    if not path.is_file():
        raise MissingInputError(f"{path}: no manifest for split {split!r} (a dataset prepared by "
                                "an older version, or not by cascade-clip): prepare it again")
    raw = path.read_bytes()
    files = {}
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel in files:
            raise InputError(f"{path}: line {number} is not '<sha256>  <path>' (or repeats a path)")
        files[rel] = digest
    return SplitManifest(root, split, files, hashlib.sha256(raw).hexdigest())


def check_manifest(root: str | Path, split: str, workers: int | None = None,
                   progress: bool = True) -> list[str]:
    """Hash the split's files again and compare: one line per file that changed, is missing
    or is not in the manifest (empty when the split is as prepared)."""
    manifest = read_manifest(root, split)
    root = Path(root)
    on_disk = [rel for rel in dataset_files(root) if _split_of(rel) in (None, split)]
    problems = [f"{root / rel}: not in {manifest.path}" for rel in on_disk if rel not in manifest.files]
    present = [rel for rel in manifest.files if (root / rel).is_file()]
    problems += [f"{root / rel}: missing" for rel in manifest.files.keys() - set(present)]
    digests = hash_files(root, present, workers, progress, desc=f"check {split}")
    problems += [f"{root / rel}: content differs from {manifest.path}"
                 for rel, d in digests.items() if d != manifest.files[rel]]
    return sorted(problems)
