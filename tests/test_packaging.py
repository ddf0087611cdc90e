"""No folder of ours shadows an installed package when Python runs from the repository root.

`python -m` and `torchrun -m` put the working directory first on `sys.path`, and so does
pytest's rootdir. A folder there with an `__init__.py` wins over site-packages: the top-level
`kernels/` once did, and transformers 5, which imports the PyPI package `kernels` while
loading the MiniLM text tower, failed every training job (kernels/README.md says why the
folder is now a namespace portion, and a namespace portion never wins over a package).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import make_tiny_dataset, tiny_config, write_config

from cascade_clip.pretrain import MINILM

REPO = Path(__file__).resolve().parents[1]


def _run_from_repo_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_no_top_level_folder_is_a_regular_package_but_the_project():
    """A regular package at the top level would shadow any installed package of its name."""
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert packages == ["cascade_clip"], packages


def test_import_kernels_from_the_repository_root_never_runs_ours():
    probe = "import json, kernels as k; print(json.dumps([getattr(k, '__file__', None), list(k.__path__)]))"
    proc = _run_from_repo_root("-c", probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, path = json.loads(proc.stdout.splitlines()[-1])
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        # Nothing installed by that name: an empty namespace, none of our code runs.
        assert file is None and path == [str(REPO / "kernels")], (file, path)
    else:
        # The installed distribution's own module, whatever stands in the working directory.
        installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
        assert file is not None and Path(file).resolve() == installed, (file, installed)
    # ours stays reachable under its package name
    proc = _run_from_repo_root("-c", "import cascade_clip.kernels.nga as m; print(m.__file__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve() == (REPO / "kernels" / "nga.py").resolve()


def test_torchrun_training_loads_the_minilm_text_tower_from_the_repository_root(tmp_path, tiny_clip_config):
    """What every multi-GPU training job does (`torchrun -m cascade_clip.cli train`; one
    process runs the console script) in the repository root, with a CLIP whose text tower is
    transformers' MiniLM."""
    clip = dict(tiny_clip_config)
    clip["text_cfg"] = {
        "hf_model_name": MINILM,
        "hf_tokenizer_name": MINILM,
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
        "context_length": 16,
    }
    root = make_tiny_dataset(tmp_path / "data", n_train=2, n_val=1)
    cfg = write_config(tiny_config(root, clip, iters=1, checkpoint_interval=1), tmp_path / "config.yaml")
    proc = _run_from_repo_root(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "cascade_clip.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "run"),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert (tmp_path / "run" / "model_final.pt").is_file()
    # transformers' loading report for the pooler MiniLM ships but CLIP never uses is expected
    # and silenced (cascade_clip/model/clip_loader.py); real warnings would still show.
    assert "UNEXPECTED" not in output, output[-4000:]


def test_only_the_expected_loading_report_is_silenced():
    import logging

    from cascade_clip.model.clip_loader import _DropExpectedLoadReport

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, (), None)

    def report(*rows: str) -> logging.LogRecord:
        table = "Key                 | Status     |  | \n--------------------+------------+--+-\n"
        return record("\x1b[1mBertModel LOAD REPORT\x1b[0m from: model\n" + table + "\n".join(rows))

    drop = _DropExpectedLoadReport()
    pooler = (
        "pooler.dense.weight | \x1b[38;5;208mUNEXPECTED\x1b[0m |  | ",
        "pooler.dense.bias   | UNEXPECTED |  | ",
    )
    assert not drop.filter(report(*pooler))
    assert drop.filter(report(*pooler, "embeddings.word_embeddings.weight | MISSING |  | "))
    assert drop.filter(report("encoder.layer.0.output.dense.weight | UNEXPECTED |  | "))
    assert drop.filter(record("something else"))


def _quick_start_lines() -> list[str]:
    """The README quick start's first code block, comments dropped (what a user types)."""
    text = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
    block = text.split("```", 2)[1].split("\n", 1)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_ci_and_conda_install_from_the_lock():
    import yaml

    install, demo, tests = _quick_start_lines()
    assert install == "pip install -e '.[dev]' -c requirements-lock.txt"
    assert demo == "snakemake --cores all"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci  # verbatim, each on its own line
    assert "python3 -m venv" in "\n".join(ci)  # in a venv of its own
    conda = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lines = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert "-c requirements-lock.txt" in pip_lines and '-e ".[dev]"' in pip_lines


def test_lock_pins_every_dependency_of_the_project():
    """Every requirement of pyproject (dev extra included) has a pin in the lock, and the pins
    satisfy pyproject's ranges: a dependency added without `.ci/lock` fails here."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    sys.path.insert(0, str(REPO / ".ci"))
    try:
        from check_lock import locked_versions
    finally:
        sys.path.pop(0)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = locked_versions()
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements-lock.txt (run .ci/lock)"
        assert req.specifier.contains(locked[name], prereleases=True), (text, locked[name])


def test_the_wheel_installs_the_kernels_as_cascade_clip_kernels_only(tmp_path):
    """The non-editable install: the wheel holds the kernel modules under cascade_clip/kernels/
    and nothing at the top level but cascade_clip, and they import from the unpacked wheel."""
    import zipfile

    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = _run_from_repo_root("-c", build, str(tmp_path / "dist"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"cascade_clip"}, top
    assert {"cascade_clip/kernels/nga.py", "cascade_clip/kernels/seg_loss.py"} <= set(names)
    # the open-vocabulary suite's class lists, which the registry reads at import
    assert {f"cascade_clip/data/classes/{f}" for f in ("ade20k_150.txt", "ade20k_847.tsv",
                                                       "pascal_context_459.txt")} <= set(names)
    # PYTHONPATH comes before site-packages, where the editable install's finder also sits
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        [sys.executable, "-c", "import cascade_clip.kernels.nga as m; print(m.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == tmp_path / "site" / "cascade_clip" / "kernels" / "nga.py"


def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_imports_hold_no_circle():
    """No module of cascade_clip imports, at any depth and even inside a function, a module
    that imports it back: each layer (config, model, cache, train, paper, report) stands on the
    ones below. An import of a package counts as an import of its __init__, except from a
    module of that package."""
    import ast

    modules = {_module_of(p): p for p in (REPO / "cascade_clip").rglob("*.py") if "kernels" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from cascade_clip.cache import write` imports the module cascade_clip.cache.write;
                # `from cascade_clip.cache import open_cache`, the package's __init__
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        # a module may use its own package's face (the __init__ that lazily imports it)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}

    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
