"""Resumable, checksummed downloads and safe archive extraction.

`download` streams a URL to `<dest>.part` (resuming it with an HTTP Range request when it
exists), retries transient failures with exponential backoff, verifies the digests it is
given and only then renames the file to `dest`. A file with no published digest gets its
sha256 recorded at first download in a sidecar `<dest>.sha256` (sha256sum's format), and every
later call verifies the file against that record. `extract` unpacks a tar or zip archive
after checking every member, and leaves a marker so that a re-run skips it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from cascade_clip.errors import CascadeClipError, InputError, MissingInputError

log = logging.getLogger(__name__)

# HTTP statuses worth another try; anything else 4xx/5xx is final.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 20


class DownloadError(CascadeClipError, RuntimeError):
    """A download failed for good (a final HTTP status, or retries exhausted)."""


class ChecksumError(InputError):
    """A downloaded file's digest differs from the expected one."""


class UnsafeArchiveError(InputError):
    """An archive member would land outside the destination; nothing was extracted."""


class _Transient(Exception):
    """A failure worth retrying (connection dropped, timeout, 5xx)."""


def file_digests(path: str | Path, algorithms: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Hex digests of a file for each hashlib algorithm name, reading it once."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _expected(md5: str | None, sha1: str | None, sha256: str | None) -> dict[str, str]:
    out = {}
    for name, value, size in (("md5", md5, 32), ("sha1", sha1, 40), ("sha256", sha256, 64)):
        if value:
            value = value.strip().lower()
            if not re.fullmatch(rf"[0-9a-f]{{{size}}}", value):
                raise InputError(f"{name} digest {value!r} is not {size} hex digits")
            out[name] = value
    return out


def sidecar_path(dest: str | Path) -> Path:
    """Where the sha256 of a file with no published digest is recorded: `<dest>.sha256`."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".sha256")


def recorded_digest(dest: str | Path) -> str | None:
    """The sha256 recorded for `dest` at its first download, or None if there is no record."""
    record = sidecar_path(dest)
    if not record.is_file():
        return None
    fields = record.read_text().split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0].lower()):
        raise InputError(f"{record}: not a sha256 record (expected '<64 hex digits>  <file name>'); "
                         "delete it to record the digest again")
    return fields[0].lower()


def _record(dest: Path, digest: str) -> None:
    sidecar_path(dest).write_text(f"{digest}  {dest.name}\n")


def _mismatches(path: Path, expected: dict[str, str]) -> list[tuple[str, str, str]]:
    got = file_digests(path, tuple(expected))
    return [(name, expected[name], got[name]) for name in expected if got[name] != expected[name]]


def download(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    sha1: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    Streams to `<dest>.part`, resuming an existing part file with `Range: bytes=N-`; a
    transient failure (dropped connection, timeout, HTTP 408/429/5xx) is retried up to
    `retries` times with `backoff * 2**k` seconds between tries (the count resets whenever a
    try made progress). The finished part file is checked against every digest given and
    then renamed to `dest` atomically. A mismatch deletes the part file and raises
    ChecksumError naming the file and both digests. A `dest` that already verifies is
    returned at once.

    With no digest given, the sha256 recorded in `<dest>.sha256` (see `sidecar_path`) is the
    expected digest; with no record either, the file's sha256 is computed (after the
    download, or from an existing `dest`) and recorded there, so that every later call
    verifies it (trust on first use).
    """
    dest = Path(dest)
    expected = _expected(md5, sha1, sha256)
    recorded = None if expected else recorded_digest(dest)
    if recorded:
        expected = {"sha256": recorded}
    if dest.is_file():
        if not expected:
            digest = file_digests(dest, ("sha256",))["sha256"]
            _record(dest, digest)
            log.warning("%s: no published digest; recorded the existing file's sha256 %s in %s",
                        dest, digest, sidecar_path(dest))
            return dest
        bad = _mismatches(dest, expected)
        if not bad:
            return dest
        log.warning("%s exists but does not verify (%s%s); downloading it again", dest, bad[0][0],
                    f" recorded in {sidecar_path(dest)}" if recorded else "")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part, timeout, progress, dest.name)
            break
        except _Transient as err:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(
                    f"{url}: giving up after {retries} retries ({err}); "
                    f"partial file kept at {part} for a later resume"
                ) from None
            delay = backoff * 2 ** (failures - 1)
            log.warning("%s: %s; retrying in %.1fs", url, err, delay)
            time.sleep(delay)

    if expected:
        bad = _mismatches(part, expected)
        if bad:
            part.unlink()
            name, want, got = bad[0]
            origin = (f"; {want} was recorded at the first download in {sidecar_path(dest)}: "
                      "delete that file only if the server's copy changed on purpose") if recorded else ""
            raise ChecksumError(
                f"{dest}: {name} checksum mismatch: expected {want}, got {got} "
                f"(downloaded from {url}; the file was removed{origin})"
            )
    else:
        digest = file_digests(part, ("sha256",))["sha256"]
        _record(dest, digest)
        log.warning("%s: no published digest; recorded its sha256 %s in %s (checked on every later "
                    "run)", dest, digest, sidecar_path(dest))
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """One try: append to (or restart) `part` from the server. Raises _Transient to retry."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cascade-clip-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Nothing left to send from `offset`: the part file holds the whole payload if
            # the server's total size says so; otherwise it is junk and starts over.
            total = _content_range_total(err.headers.get("Content-Range", ""))
            if total == offset:
                return
            part.unlink()
            raise _Transient(f"HTTP 416 at offset {offset}; restarting from 0") from None
        if err.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _Transient(f"{type(err).__name__}: {reason}") from None

    with response:
        status = getattr(response, "status", 200)
        mode = "wb"
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise _Transient(f"server resumed at byte {start}, expected {offset}")
            mode = "ab"
        else:
            offset = 0  # server ignored the Range request: start over
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + length if length is not None else None
        received = 0
        with (
            open(part, mode) as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=label, disable=not progress, leave=False) as bar,
        ):
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (TimeoutError, http.client.HTTPException, OSError) as err:
                    raise _Transient(f"{type(err).__name__} after {offset + received} bytes") from None
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received < length:
            raise _Transient(f"connection closed after {offset + received} of {total} bytes")


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value)
    return int(m.group(1)) if m else None


def _content_range_total(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", value)
    return int(m.group(1)) if m else None


# --- extraction -------------------------------------------------------------------------


def _marker(archive: Path, dest_dir: Path) -> Path:
    return dest_dir / f".{archive.name}.extracted"


def _archive_stamp(archive: Path) -> dict:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_name(name: str, archive: Path) -> str:
    """Refuse absolute paths, drive letters and `..`; return the normalised posix name."""
    posix = name.replace("\\", "/")
    if not posix or posix.startswith("/") or PureWindowsPath(name).drive:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; nothing extracted")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; nothing extracted")
    return posixpath.normpath(posix)


def _inside(target: str) -> bool:
    """Whether a normalised path relative to the destination stays inside it."""
    return not (target.startswith("/") or target == ".." or target.startswith("../"))


def _check_link(name: str, link: str, relative_to_member: bool, archive: Path) -> None:
    if link.startswith("/") or PureWindowsPath(link).drive:
        raise UnsafeArchiveError(
            f"{archive}: link {name!r} -> {link!r} points outside the destination; nothing extracted"
        )
    base = posixpath.dirname(name) if relative_to_member else ""
    if not _inside(posixpath.normpath(posixpath.join(base, link))):
        raise UnsafeArchiveError(
            f"{archive}: link {name!r} -> {link!r} points outside the destination; nothing extracted"
        )


def _tar_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        name = _check_name(m.name, archive)
        if m.issym():
            _check_link(name, m.linkname, True, archive)
        elif m.islnk():
            _check_link(name, _check_name(m.linkname, archive), False, archive)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a device or fifo; nothing extracted"
            )
    return members


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for info in members:
        name = _check_name(info.filename, archive)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink; target is the data
            _check_link(name, zf.read(info).decode("utf-8", "replace"), True, archive)
    return members


def extract(archive: str | Path, dest_dir: str | Path) -> Path:
    """Unpack a tar (any compression) or zip archive into `dest_dir`; return `dest_dir`.

    Every member is checked first: an absolute path, a `..` component, a link pointing
    outside `dest_dir` or a device file raises UnsafeArchiveError and nothing is written;
    an archive with no members raises ValueError. On success a marker
    `<dest_dir>/.<archive name>.extracted` records the archive's size and mtime, and a later
    call with the same archive returns at once.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise MissingInputError(f"{archive}: archive not found")
    marker = _marker(archive, dest_dir)
    stamp = _archive_stamp(archive)
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return dest_dir
        except (json.JSONDecodeError, OSError):
            pass

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = _zip_members(zf, archive)
            if not members:
                raise InputError(f"{archive}: archive is empty; nothing to extract")
            dest_dir.mkdir(parents=True, exist_ok=True)
            zf.extractall(dest_dir, members)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = _tar_members(tar, archive)
            if not members:
                raise InputError(f"{archive}: archive is empty; nothing to extract")
            dest_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest_dir, members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest_dir, members)
    else:
        raise InputError(f"{archive}: not a tar or zip archive")
    marker.write_text(json.dumps(stamp))
    return dest_dir


# --- dataset sources ----------------------------------------------------------------------


def load_sources(path: str | Path | None = None) -> dict[str, list[dict]]:
    """{dataset: [file entries]} from a sources YAML (default: the packaged sources.yaml).

    An entry has name, url, optional md5/sha1/sha256 and extract_to (folder, or null).
    """
    import yaml

    if path is None:
        from importlib.resources import files

        text, where = files("cascade_clip.data").joinpath("sources.yaml").read_text(), "sources.yaml"
    else:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"{path}: sources file not found")
        text, where = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: top level must map dataset names to {{files: [...]}}")
    out = {}
    for dataset, section in data.items():
        files_ = section.get("files") if isinstance(section, dict) else None
        if not isinstance(files_, list) or not files_:
            raise InputError(f"{where}: {dataset}: expected a non-empty 'files' list")
        for entry in files_:
            if not isinstance(entry, dict) or not entry.get("name") or not (
                    entry.get("url") or entry.get("registration")):
                raise InputError(f"{where}: {dataset}: every file needs a name and a url "
                                 "(or the registration page of a file you download yourself)")
            if "/" in entry["name"] or entry["name"] in (".", ".."):
                raise InputError(f"{where}: {dataset}: file name {entry['name']!r} must be a plain name")
        out[dataset] = files_
    return out


def place_local(entry: dict, dest: Path, local: str | Path | None, dataset: str) -> Path:
    """A file the user downloaded (one that needs a registration, or any they have): linked
    (else copied) from `local` to `dest` once, then verified like a download (its published
    digest, else the sha256 recorded at first use). Neither there: one line saying where to
    get it and how to point the config at it."""
    name = entry["name"]
    if local is not None:
        local = Path(local).expanduser()
        if not local.is_file():
            raise MissingInputError(f"{local}: not found (sources.local.{name} of {dataset})")
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local, dest)
            except OSError:
                shutil.copyfile(local, dest)
    if not dest.is_file():
        page = entry.get("registration")
        how = f"request it at {page}, then " if page else ""
        raise MissingInputError(
            f"{dest}: {dataset} needs {name}, which is not downloaded for you: {how}point the "
            f"config at your copy (sources: {{local: {{{name}: /path/to/{name}}}}}) or put it there"
        )
    expected = _expected(entry.get("md5"), entry.get("sha1"), entry.get("sha256"))
    recorded = None if expected else recorded_digest(dest)
    if recorded:
        expected = {"sha256": recorded}
    if not expected:
        digest = file_digests(dest, ("sha256",))["sha256"]
        _record(dest, digest)
        log.warning("%s: no published digest; recorded its sha256 %s in %s (checked on every later "
                    "run)", dest, digest, sidecar_path(dest))
        return dest
    bad = _mismatches(dest, expected)
    if bad:
        algo, want, got = bad[0]
        dest.unlink()
        origin = f" recorded at first use in {sidecar_path(dest)}" if recorded else ""
        raise ChecksumError(f"{local or dest}: {algo} checksum mismatch: expected {want}{origin}, got {got} "
                            f"({name} of {dataset}; not used)")
    return dest


def fetch_dataset(
    dataset: str,
    root: str | Path,
    *,
    sources: dict | None = None,
    base_url: str | None = None,
    unpack: bool = True,
    local: dict[str, str] | None = None,
    **download_kwargs,
) -> Path:
    """Download (and extract) every file of `dataset` into `<root>/<dataset>/`; return it.

    `sources` is `load_sources()`'s result or the YAML layout; None = the packaged file.
    `base_url` replaces each file's URL by `<base_url>/<name>` (a mirror or a test server).
    `local` maps file names to copies the user has (see `place_local`); a file the sources
    give a `registration` page instead of a URL must be one of them (or already in place).
    """
    sources = load_sources() if sources is None else sources
    if isinstance(sources.get(dataset), dict):  # the YAML layout {dataset: {files: [...]}}
        sources = {dataset: sources[dataset].get("files") or []}
    if dataset not in sources:
        raise InputError(f"no download sources for {dataset!r}; known: {sorted(sources)}")
    folder = Path(root) / dataset
    local = local or {}
    for entry in sources[dataset]:
        if entry["name"] in local or not entry.get("url"):
            path = place_local(entry, folder / entry["name"], local.get(entry["name"]), dataset)
            if unpack and entry.get("extract_to") is not None:
                extract(path, folder / entry["extract_to"])
            continue
        url = f"{base_url.rstrip('/')}/{entry['name']}" if base_url else entry["url"]
        path = download(url, folder / entry["name"], md5=entry.get("md5"),
                        sha256=entry.get("sha256"), sha1=entry.get("sha1"), **download_kwargs)
        if unpack and entry.get("extract_to") is not None:
            extract(path, folder / entry["extract_to"])
    return folder
