"""cascade_clip.download against a local HTTP server (127.0.0.1, started here), and extract."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cascade_clip.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download,
    extract,
    fetch_dataset,
    load_sources,
)

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB, several read chunks


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a server thread for long

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.drop_once:  # promise everything, send half, hang up
            srv.drop_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.drop_once, srv.log, srv.ignore_range = {}, set(), [], False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


FAST = {"progress": False, "timeout": 5, "backoff": 0.0}


def test_full_download_verifies_and_renames(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "sub" / "a.bin"
    out = download(f"{server.url}/a.bin", dest, md5=_md5(PAYLOAD),
                   sha256=hashlib.sha256(PAYLOAD).hexdigest(), **FAST)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "a.bin.part").exists()
    # A dest that verifies is not fetched again.
    n = len(server.log)
    download(f"{server.url}/a.bin", dest, md5=_md5(PAYLOAD), **FAST)
    assert len(server.log) == n


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["/big.bin"] = PAYLOAD
    server.drop_once.add("/big.bin")
    dest = tmp_path / "big.bin"
    download(f"{server.url}/big.bin", dest, md5=_md5(PAYLOAD), retries=3, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.log) == 2
    assert server.log[0][1] is None
    assert server.log[1][1] == f"bytes={len(PAYLOAD) // 2}-"


def test_existing_part_file_is_resumed(server, tmp_path):
    server.files["/p.bin"] = PAYLOAD
    dest = tmp_path / "p.bin"
    (tmp_path / "p.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{server.url}/p.bin", dest, md5=_md5(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/p.bin", "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/r.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "r.bin.part").write_bytes(b"stale bytes")
    download(f"{server.url}/r.bin", tmp_path / "r.bin", md5=_md5(PAYLOAD), **FAST)
    assert (tmp_path / "r.bin").read_bytes() == PAYLOAD


def test_complete_part_file_gets_416_and_verifies(server, tmp_path):
    server.files["/c.bin"] = PAYLOAD
    (tmp_path / "c.bin.part").write_bytes(PAYLOAD)
    download(f"{server.url}/c.bin", tmp_path / "c.bin", md5=_md5(PAYLOAD), **FAST)
    assert (tmp_path / "c.bin").read_bytes() == PAYLOAD


def test_corrupt_payload_fails_checksum_and_leaves_no_dest(server, tmp_path):
    server.files["/bad.bin"] = PAYLOAD[:-1] + b"X"
    dest = tmp_path / "bad.bin"
    want = _md5(PAYLOAD)
    with pytest.raises(ChecksumError) as info:
        download(f"{server.url}/bad.bin", dest, md5=want, **FAST)
    msg = str(info.value)
    assert "bad.bin" in msg and want in msg and _md5(server.files["/bad.bin"]) in msg
    assert not dest.exists() and not (tmp_path / "bad.bin.part").exists()


def test_missing_file_is_final_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/nope", tmp_path / "nope", retries=3, **FAST)
    assert len(server.log) == 1


def test_unreachable_server_gives_up_after_retries(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DownloadError, match="giving up after 2 retries"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=2, **FAST)


def test_bad_digest_argument(tmp_path):
    with pytest.raises(ValueError, match="md5"):
        download("http://127.0.0.1:9/x", tmp_path / "x", md5="xyz", **FAST)


# --- extract ------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """members: (name, data, symlink target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_tar_and_marker_skips_rerun(tmp_path):
    arc = _tar(tmp_path / "ok.tgz", [("top/a.txt", b"a", None), ("top/link", None, "a.txt")])
    dest = tmp_path / "out"
    assert extract(arc, dest) == dest
    assert (dest / "top" / "a.txt").read_bytes() == b"a"
    (dest / "top" / "a.txt").unlink()
    extract(arc, dest)  # marker: skipped
    assert not (dest / "top" / "a.txt").exists()


@pytest.mark.parametrize(
    "members",
    [
        [("good.txt", b"g", None), ("../evil.txt", b"x", None)],
        [("good.txt", b"g", None), ("/tmp/evil_abs.txt", b"x", None)],
        [("good.txt", b"g", None), ("sub/link", None, "../../outside")],
        [("good.txt", b"g", None), ("link", None, "/etc/passwd")],
    ],
    ids=["dotdot", "absolute", "link-up", "link-absolute"],
)
def test_extract_refuses_unsafe_tar_and_writes_nothing(tmp_path, members):
    arc = _tar(tmp_path / "bad.tgz", members)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="bad.tgz"):
        extract(arc, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists()


def test_extract_refuses_zip_with_dotdot(tmp_path):
    arc = tmp_path / "bad.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("fine.txt", b"f")
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(UnsafeArchiveError, match=r"\.\."):
        extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_extract_zip_and_empty_and_not_an_archive(tmp_path):
    arc = tmp_path / "ok.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("d/x.txt", b"x")
    extract(arc, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "x.txt").read_bytes() == b"x"
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ValueError, match="empty"):
        extract(empty, tmp_path / "out2")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a tar or zip"):
        extract(junk, tmp_path / "out3")


# --- sources and the CLI ------------------------------------------------------------------


def test_packaged_sources_cover_real_datasets():
    src = load_sources()
    assert set(src) == {"coco_stuff_164k", "voc12", "pascal_context_59"}
    names = {e["name"] for files in src.values() for e in files}
    assert {"train2017.zip", "val2017.zip", "stuffthingmaps_trainval2017.zip",
            "VOCtrainval_11-May-2012.tar", "benchmark.tgz", "VOCtrainval_03-May-2010.tar",
            "trainval_merged.json"} <= names
    for files in src.values():
        for e in files:
            assert e["url"].startswith("http")
            for key, n in (("md5", 32), ("sha1", 40), ("sha256", 64)):
                assert e.get(key) is None or re.fullmatch(f"[0-9a-f]{{{n}}}", e[key])


def test_cli_download_with_base_url(server, tmp_path):
    from cascade_clip.cli import main

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("VOCdevkit/VOC2010/JPEGImages/x.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    tar_bytes, json_bytes = buf.getvalue(), b'{"images": [], "annos_segmentation": []}'
    server.files["/VOCtrainval_03-May-2010.tar"] = tar_bytes
    server.files["/trainval_merged.json"] = json_bytes
    server.drop_once.add("/trainval_merged.json")
    sources = {"pascal_context_59": {"files": [
        {"name": "VOCtrainval_03-May-2010.tar", "url": "https://example.invalid/a.tar",
         "md5": _md5(tar_bytes), "extract_to": "."},
        {"name": "trainval_merged.json", "url": "https://example.invalid/t.json",
         "sha1": hashlib.sha1(json_bytes).hexdigest(), "extract_to": None},
    ]}}
    sources_file = tmp_path / "sources.yaml"
    sources_file.write_text(yaml.safe_dump(sources))
    root = tmp_path / "downloads"
    argv = ["download", "--dataset", "pascal_context_59", "--root", str(root), "--base-url",
            server.url, "--sources", str(sources_file), "--no-progress"]
    assert main(argv) == 0
    folder = root / "pascal_context_59"
    assert (folder / "VOCdevkit" / "VOC2010" / "JPEGImages" / "x.jpg").read_bytes() == b"jpg"
    assert (folder / "trainval_merged.json").read_bytes() == json_bytes
    n = len(server.log)
    assert main(argv) == 0  # everything verifies: nothing fetched again
    assert len(server.log) == n
    # The library entry point with a wrong digest fails and leaves no file.
    sources["pascal_context_59"]["files"][1]["sha1"] = "0" * 40
    (folder / "trainval_merged.json").unlink()
    with pytest.raises(ChecksumError, match="trainval_merged.json"):
        fetch_dataset("pascal_context_59", root, sources=sources, base_url=server.url,
                      progress=False, backoff=0.0)
    assert not (folder / "trainval_merged.json").exists()
