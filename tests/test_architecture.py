"""The package's shape: no import circles, the library free of Hydra and of the layers above it,
one preprocessing for every consumer, and a package that works when pip-installed."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cxr_lightning"
CLI = "cxr_lightning.cli"
TASKS = "cxr_lightning.tasks"
HYDRA_FREE = ("cxr_lightning.data", "cxr_lightning.models")
# A string naming a module (``"cxr_lightning.tasks.train:train"``, a ``_target_``): an import too.
MODULE_STRING = re.compile(r"^(cxr_lightning(?:\.\w+)+)(?::\w+)?$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (``a.b.func`` -> ``a.b``), or None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``) imports, wherever the import stands: module level,
    inside functions, under ``if __name__ == "__main__":``, or as a string handed to importlib or Hydra."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import module` imports that module; `from module import name`, the module.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES
            found.update(submodules or {base})
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = MODULE_STRING.match(node.value)
            if match and _resolve(match.group(1)):
                found.add(_resolve(match.group(1)))
    return found


def is_entry_shim(path: Path) -> bool:
    """A ``python -m`` shim: a docstring, ``from cxr_lightning.cli import <x>_main`` and a main guard
    calling it; nothing else."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) != 2:
        return False
    imported, guard = body
    return (
        isinstance(imported, ast.ImportFrom) and imported.module == CLI and len(imported.names) == 1
        and imported.names[0].name.endswith("_main")
        and isinstance(guard, ast.If) and isinstance(guard.test, ast.Compare)
        and isinstance(guard.test.left, ast.Name) and guard.test.left.id == "__name__"
        and imported.names[0].name in {n.id for n in ast.walk(guard) if isinstance(n, ast.Name)}
    )


def floor(name: str) -> int:
    """3: the commands (cli/ and the ``python -m`` shims); 2: the tasks; 1: the library."""
    if name == CLI or name.startswith(CLI + "."):
        return 3
    if name == TASKS or name.startswith(TASKS + "."):
        return 2
    return 3 if name in SHIMS else 1


PATHS = {module_name(p): p for p in PACKAGE.rglob("*.py")}
SHIMS = {name for name, path in PATHS.items() if is_entry_shim(path)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in PATHS.items()}


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import cxr_lightning.losses\n"
        "def f():\n    from cxr_lightning.tasks import train\n"
        "if __name__ == '__main__':\n    from cxr_lightning.cli import train_main\n"
        "TARGET = 'cxr_lightning.metrics.build_metrics'\n"
    )
    found = imports_of(source, "cxr_lightning.data.probe")
    assert {"cxr_lightning.losses", "cxr_lightning.tasks.train", "cxr_lightning.cli", "cxr_lightning.metrics"} <= found


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import circles: {cycles}"


def test_no_module_imports_a_floor_above_its_own(graph):
    assert floor("cxr_lightning.data.datamodule") == 1 and floor("cxr_lightning.tasks.evaluate") == 2
    assert floor("cxr_lightning.train") == 3 and floor("cxr_lightning.checkpoints") == 1
    upward = {m: sorted(d for d in deps if floor(d) > floor(m)) for m, deps in graph.items()}
    assert not {m: d for m, d in upward.items() if d}


def test_task_code_lives_in_tasks():
    """Below tasks/ nothing reads a composed config: DictConfig and Hydra's instantiate are the
    tasks' (and build.py's) alone."""
    offenders = {}
    for name, path in PATHS.items():
        if floor(name) != 1:
            continue
        text = path.read_text()
        bad = [w for w in ("hydra.utils.instantiate", "from hydra", "import hydra", "DictConfig") if w in text]
        if bad:
            offenders[name] = bad
    assert not offenders


def test_every_command_is_a_script_and_a_python_m_module():
    """``cxr-<command>`` in [project.scripts] and ``python -m cxr_lightning.<command>`` reach the same main."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"cxr-train", "cxr-evaluate", "cxr-explain", "cxr-predict", "cxr-export"} <= set(scripts)
    shim_mains = {}
    for name in SHIMS:
        imported = next(n for n in ast.parse(PATHS[name].read_text()).body if isinstance(n, ast.ImportFrom))
        shim_mains[name.removesuffix(".__main__")] = imported.names[0].name
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == CLI, script
        command = script.removeprefix("cxr-")
        assert shim_mains.get(f"cxr_lightning.{command}") == function, (
            f"{script} runs {function}, but no cxr_lightning.{command} shim (module or __main__) calls it"
        )
    scripted = {f"cxr_lightning.{s.removeprefix('cxr-')}" for s in scripts}
    assert not set(shim_mains) - scripted, "a `python -m` shim without its cxr-<command> line in [project.scripts]"


def test_data_and_models_import_no_hydra():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith(HYDRA_FREE):
            bad = sorted(m for m in imports_of(path) if m.split(".")[0] in ("hydra", "omegaconf"))
            if bad:
                offenders[name] = bad
    assert not offenders


def test_predict_export_and_training_share_one_preprocessing(tiny_demo, tmp_path):
    """The same image reaches the network as the same tensor in training, inference and export."""
    from helpers import fit_tiny

    from cxr_lightning import inference
    from cxr_lightning.checkpoints import load_model
    from cxr_lightning.data import images
    from cxr_lightning.inputs import ImageFiles
    from cxr_lightning.tasks import export as export_task

    _, ckpt = fit_tiny(tiny_demo, tmp_path)
    model = load_model(ckpt)
    path = sorted(tiny_demo.rglob("*.png"))[0]
    pixels = torch.from_numpy(images.load_resized(path, model.hparams.image_size))[None, None]
    # Training: the batch hook of the LightningModule (no trainer: no augmentation).
    trained = model.on_after_batch_transfer({"image": pixels.clone()}, 0)["image"]
    # Inference (evaluate, explain, predict): the one loop.
    meta = torch.zeros(1, len(model.meta_names))
    (inferred,) = [b["input"] for b in inference.model_batches(model, [{"image": pixels, "meta": meta}], "cpu")]
    torch.testing.assert_close(inferred, trained, rtol=0, atol=0)
    expected = (pixels.float() / 255 - model.hparams.mean) / model.hparams.std
    torch.testing.assert_close(trained, expected)
    # predict's loader yields raw pixels for that loop; export states the same preprocessing.
    sample = ImageFiles([str(path)], meta.numpy(), model.hparams.image_size)[0]
    assert torch.equal(sample["image"][None], pixels)
    metadata = export_task.export_metadata(model, ckpt)
    assert float(metadata["mean"]) == model.preprocess.mean and float(metadata["std"]) == model.preprocess.std


# --------------------------------------------------------------------------------------------------
# A regular install
def source_copy(dest: Path) -> Path:
    """The project's files as a clean clone has them: a build in the checkout itself would reuse a
    stale build/ folder (files deleted since would ship)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("cxr_lightning", "conf"):
        shutil.copytree(
            REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "conf"), symlinks=False
        )
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (not editable) into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    source = source_copy(tmp_path_factory.mktemp("source"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (out / "dist").glob("cxr_lightning-*.whl")
    site = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def test_the_wheel_holds_every_config(installed):
    (wheel,) = installed.parent.glob("dist/cxr_lightning-*.whl")
    shipped = {n.removeprefix("cxr_lightning/conf/") for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    in_repo = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert in_repo and shipped == in_repo


def test_the_source_distribution_installs_every_config(tmp_path):
    source = source_copy(tmp_path / "source")
    sdist = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("cxr_lightning-*.tar.gz")
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--target",
            str(site),
            str(archive),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    installed = {
        p.relative_to(site / "cxr_lightning" / "conf").as_posix()
        for p in (site / "cxr_lightning" / "conf").rglob("*.yaml")
    }
    assert installed == {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}


def _run_installed(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "CXR_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_installed_package_composes_trains_and_predicts_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run_installed(installed, elsewhere, "-c", "import cxr_lightning; print(cxr_lightning.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stderr
    for command in ("train", "evaluate", "explain", "predict", "export", "bench", "cache"):
        extra = ["input=x.png"] if command == "predict" else []
        done = _run_installed(installed, elsewhere, "-m", f"cxr_lightning.{command}", "--cfg", "job", *extra)
        assert done.returncode == 0 and "paths:" in done.stdout, (command, done.stderr[-2000:])
    for command in ("compare", "summary", "demo"):
        done = _run_installed(installed, elsewhere, "-m", f"cxr_lightning.{command}", "--help")
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-2000:])

    run = elsewhere / "run"
    fit = _run_installed(
        installed, elsewhere, "-m", "cxr_lightning.train", "data.demo.patients=12", "data.demo.image_size=64",
        "data.image_size=64", "data.num_workers=0", "backbone=tiny", "trainer.max_epochs=1", "test_after_fit=false",
        "callbacks.progress_bar=null", f"hydra.run.dir={run}",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    image = sorted((elsewhere / "cache").rglob("*.png"))[0]
    predicted = _run_installed(
        installed, elsewhere, "-m", "cxr_lightning.predict", f"run_dir={run}", f"input={image}",
        f"output={elsewhere / 'predictions.csv'}",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    table = np.genfromtxt(elsewhere / "predictions.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert table.size == 1 and 0.0 <= float(table["Atelectasis"]) <= 1.0


def test_a_framework_error_is_one_line_and_exit_status_2(installed, tmp_path):
    done = _run_installed(
        installed, tmp_path, "-m", "cxr_lightning.evaluate", "ckpt_path=missing.ckpt", "output_dir=out"
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: CheckpointError: Checkpoint missing.ckpt does not exist."]


def test_the_standard_table_columns_are_spelled_only_in_the_data_layer():
    """Above data/, the column names of the standard table, the box table and ``No Finding`` are
    read from their owners (data/nih.py, labels.py), never spelled again."""
    from cxr_lightning.data import nih
    from cxr_lightning.labels import NO_FINDING

    names = {*nih.REQUIRED_COLUMNS, nih.BOX_FINDING, NO_FINDING}
    owners = {PACKAGE / "labels.py"}
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path in owners or path.is_relative_to(PACKAGE / "data"):
            continue
        spelled = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)} & names
        if spelled:
            offenders[module_name(path)] = sorted(spelled)
    assert not offenders
