"""What a file someone else made may hold: the one schema every reader of such a file checks.

A checkpoint, a bundle, the sidecars beside them (thresholds, calibration), a run directory's
``metrics.json`` and ``config.yaml``: a researcher opens these after a colleague shares them, so
every value read from them is data, checked here before anything uses it:

- :func:`plain_data`: JSON-like values only (dicts with string keys, lists, strings, finite
  numbers, booleans, None), nested at most :data:`MAX_DEPTH` deep, with at most :data:`MAX_NODES`
  values and strings of at most :data:`MAX_STRING` characters;
- :func:`hyperparameters`: a model's hyperparameters (known keys only, bounded sizes, no
  ``_target_`` where a config becomes keyword arguments), label and metadata names included;
- :func:`thresholds_file`, :func:`calibration_data`: the sidecars' numbers (finite, in range);
- :func:`read_json`: a JSON file read under a size limit, its parse errors (deep nesting included)
  one :class:`~cxr_lightning.errors.CheckpointError` line;
- :func:`file_name_in`: a file name recorded in such a file, rebuilt inside a folder the command
  was given, so no recorded path is ever used to read, write or delete.

Anything outside the schema raises ``CheckpointError`` (or the caller's error class) naming the
file and the key, in one line. pydantic would need every node's keys declared, while configs gain
keys with every backbone and head; what matters here is the shape of plain data and a few bounds,
which these functions say directly.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cxr_lightning.errors import CheckpointError, CXRError

MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_STRING = 4096
MAX_LABELS = 512
MAX_META = 4096
# A model's input side: 16 px (a test model) to 2048 px (beyond any published chest X-ray model).
IMAGE_SIZE_RANGE = (16, 2048)
# Any width or count in a head/backbone/loss config (hidden units, heads, layers).
MAX_WIDTH = 65_536
# Normalisation constants (mean, std, input range).
MAX_SCALE = 1e6
# sidecars and a run directory's JSON files: far above what evaluate writes (a few hundred kB).
MAX_JSON_BYTES = 32 * 1024 * 1024
# A label is a finding's name: letters, digits, spaces and a little punctuation, never a path
# separator, a markup or formula character, or a leading sign.
LABEL_NAME = re.compile(r"[^\W_][\w .,()'+-]{0,79}")
META_NAME = re.compile(r"[^\W_][\w .,()'+:-]{0,159}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Config nodes that become keyword arguments of a class: a key starting with "_" (``_target_``,
# ``_partial_``, ``_args_``) would be Hydra's instruction to build something else.
KWARG_NODES = ("backbone", "head", "loss")


class Checker:
    """Raise ``error`` naming ``where`` and the key path."""

    def __init__(self, where: str, error: type[CXRError] = CheckpointError) -> None:
        self.where, self.error = where, error

    def fail(self, key: str, why: str) -> CXRError:
        at = f" at {key}" if key else ""
        return self.error(f"{self.where}{at}: {why}; the file does not hold what this framework writes, refusing it.")


def plain_data(value: Any, check: Checker, key: str = "", allow_nan: bool = False) -> Any:
    """``value`` when it is plain JSON-like data within the bounds above (walked without recursion)."""
    stack = [(value, key, 0)]
    nodes = 0
    while stack:
        item, at, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise check.fail(key, f"more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise check.fail(at, f"nested more than {MAX_DEPTH} levels deep")
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            if abs(item) > 2**53:
                raise check.fail(at, f"integer {str(item)[:20]}... out of range")
        elif isinstance(item, float):
            if not (math.isfinite(item) or (allow_nan and math.isnan(item))):
                raise check.fail(at, f"{item} is not a finite number")
        elif isinstance(item, str):
            if len(item) > MAX_STRING:
                raise check.fail(at, f"a string of {len(item)} characters (at most {MAX_STRING})")
        elif isinstance(item, Mapping):
            for k, v in item.items():
                if not isinstance(k, str) or len(k) > 256:
                    raise check.fail(at, f"key {str(k)[:40]!r} is not a short string")
                stack.append((v, f"{at}.{k}" if at else k, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{at}[{i}]", depth + 1) for i, v in enumerate(item))
        else:
            raise check.fail(at, f"a {type(item).__name__}, not plain data")
    return value


def read_json(path: str | os.PathLike, check: Checker, allow_nan: bool = True, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON in ``path``, read under ``max_bytes`` and checked by :func:`plain_data`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise check.fail("", f"{size} bytes, more than the {max_bytes} a file of this kind may hold")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise check.fail("", f"unreadable ({type(exc).__name__})") from None
    return loads(text, check, allow_nan)


def loads(text: str, check: Checker, allow_nan: bool = True) -> Any:
    """:func:`json.loads` of ``text`` with every way it fails as one ``check`` error."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise check.fail("", f"JSON nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, OverflowError) as exc:
        raise check.fail("", f"not valid JSON ({str(exc)[:120]})") from None
    return plain_data(value, check, allow_nan=allow_nan)


# --------------------------------------------------------------------------------------------------
# Typed fields
def number(value: Any, check: Checker, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise check.fail(key, f"{_show(value)} is not a finite number")
    if not lo <= float(value) <= hi:
        raise check.fail(key, f"{value} outside [{lo}, {hi}]")
    return float(value)


def integer(value: Any, check: Checker, key: str, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise check.fail(key, f"{_show(value)} is not an integer")
    if not lo <= value <= hi:
        raise check.fail(key, f"{value} outside [{lo}, {hi}]")
    return value


def text(value: Any, check: Checker, key: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str):
        raise check.fail(key, f"{_show(value)} is not a string")
    if pattern is not None and not pattern.fullmatch(value):
        raise check.fail(key, f"{_show(value)} is not an allowed name (letters, digits, spaces, - _ . , ( ) ' +)")
    return value


def mapping(value: Any, check: Checker, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise check.fail(key, f"{_show(value)} is not a mapping")
    return dict(value)


def names(value: Any, check: Checker, key: str, pattern: re.Pattern, most: int) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise check.fail(key, f"{_show(value)} is not a list")
    if len(value) > most:
        raise check.fail(key, f"{len(value)} names (at most {most})")
    out = [text(v, check, f"{key}[{i}]", pattern) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise check.fail(key, "a name is repeated")
    return out


def label_names(value: Any, check: Checker, key: str = "label_names") -> list[str]:
    """A model's label names: 1 to :data:`MAX_LABELS` distinct :data:`LABEL_NAME` strings."""
    out = names(value, check, key, LABEL_NAME, MAX_LABELS)
    if not out:
        raise check.fail(key, "no labels")
    return out


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# --------------------------------------------------------------------------------------------------
# Hyperparameters
@lru_cache(maxsize=1)
def hyperparameter_keys() -> frozenset[str]:
    """The keys :class:`~cxr_lightning.models.module.CXRClassifier` saves: its constructor's data arguments."""
    from cxr_lightning.models.module import CXRClassifier

    params = inspect.signature(CXRClassifier.__init__).parameters
    return frozenset(p for p in params if p != "self" and not p.endswith("_factory"))


REQUIRED_HPARAMS = ("backbone", "head", "loss", "optimizer", "label_names", "meta_names", "image_size")


def hyperparameters(hp: Any, where: str) -> dict[str, Any]:
    """A checkpoint's or bundle's hyperparameters, checked: every value the model rebuild reads."""
    check = Checker(f"{where} hyperparameters")
    hp = mapping(hp, check, "")
    plain_data(hp, check)
    unknown = sorted(set(hp) - hyperparameter_keys())
    if unknown:
        raise check.fail(unknown[0], f"unknown hyperparameter key(s) {unknown[:5]}")
    missing = [k for k in REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise check.fail("", f"missing key(s) {missing}")
    labels = label_names(hp["label_names"], check)
    names(hp["meta_names"], check, "meta_names", META_NAME, MAX_META)
    integer(hp["image_size"], check, "image_size", *IMAGE_SIZE_RANGE)
    for node in (*KWARG_NODES, "optimizer"):
        mapping(hp[node], check, node)
    for node in KWARG_NODES:
        text(hp[node].get("name"), check, f"{node}.name", LABEL_NAME)
        _kwargs(hp[node], check, node)
    # Normalisation constants: finite, on any scale a backbone declares (torchxrayvision's is +-1024).
    for key in ("mean", "std"):
        if key in hp:
            number(hp[key], check, key, -MAX_SCALE, MAX_SCALE)
    if "std" in hp and float(hp["std"]) <= 0:
        raise check.fail("std", f"{hp['std']} must be positive")
    if "input_range" in hp:
        bounds = hp["input_range"]
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise check.fail("input_range", f"{_show(bounds)} is not [low, high]")
        for i, v in enumerate(bounds):
            number(v, check, f"input_range[{i}]", -MAX_SCALE, MAX_SCALE)
    if hp.get("pos_frac") is not None:
        fractions = hp["pos_frac"]
        if not isinstance(fractions, (list, tuple)) or len(fractions) != len(labels):
            raise check.fail("pos_frac", f"not one fraction per label ({len(labels)})")
        for i, v in enumerate(fractions):
            number(v, check, f"pos_frac[{i}]", 0.0, 1.0)
    if hp.get("age_fill") is not None:
        number(hp["age_fill"], check, "age_fill", 0.0, 150.0)
    for key in ("sampler", "scheduler", "config"):
        if hp.get(key) is not None:
            mapping(hp[key], check, key)
    if "channels_last" in hp and not isinstance(hp["channels_last"], bool):
        raise check.fail("channels_last", f"{_show(hp['channels_last'])} is not true or false")
    data = (hp.get("config") or {}).get("data")
    if data is not None:
        data = mapping(data, check, "config.data")
        if data.get("augment") is not None:
            _kwargs(mapping(data["augment"], check, "config.data.augment"), check, "config.data.augment")
        if data.get("demo") is not None:
            # A demo is generated from these on the machine that opens the checkpoint.
            demo = mapping(data["demo"], check, "config.data.demo")
            _kwargs(demo, check, "config.data.demo")
            for key, most in DEMO_LIMITS.items():
                if key in demo:
                    integer(demo[key], check, f"config.data.demo.{key}", 0, most)
    return hp


# The largest demo a checkpoint's config may ask a command to generate (the shipped one: 500 patients of 256 px).
DEMO_LIMITS = {"patients": 20_000, "image_size": 1024, "images_per_folder": 1_000_000}


def _kwargs(node: Mapping[str, Any], check: Checker, key: str) -> None:
    """A config node passed as keyword arguments: no Hydra keys, bounded numbers."""
    for name, value in node.items():
        if name.startswith("_"):
            raise check.fail(f"{key}.{name}", "a Hydra key in a stored config that becomes keyword arguments")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_WIDTH:
            raise check.fail(f"{key}.{name}", f"{value} is larger than {MAX_WIDTH}")


# --------------------------------------------------------------------------------------------------
# Sidecars: thresholds and calibration
def fingerprint(saved: Mapping[str, Any], check: Checker) -> tuple[int, str]:
    """``(checkpoint_size, checkpoint_sha256)`` of a sidecar."""
    return (
        integer(saved.get("checkpoint_size"), check, "checkpoint_size"),
        text(saved.get("checkpoint_sha256"), check, "checkpoint_sha256", SHA256),
    )


def thresholds(value: Any, check: Checker, key: str = "thresholds") -> dict[str, float]:
    """``{label: threshold}``, every threshold a probability."""
    table = mapping(value, check, key)
    if len(table) > MAX_LABELS:
        raise check.fail(key, f"{len(table)} labels (at most {MAX_LABELS})")
    return {text(k, check, key, LABEL_NAME): number(v, check, f"{key}.{k}", 0.0, 1.0) for k, v in table.items()}


MAX_KNOTS = 100_000


def calibration_data(data: Any, check: Checker) -> dict[str, Any]:
    """A calibration's plain data (:meth:`cxr_lightning.calibration.Calibration.to_dict`), checked."""
    data = mapping(data, check, "")
    plain_data(data, check)
    text(data.get("method"), check, "method")
    label_names(data.get("label_names"), check)
    params = mapping(data.get("labels"), check, "labels")
    for name, par in params.items():
        par = mapping(par, check, f"labels.{name}")
        for key in ("slope", "intercept"):
            if key in par:
                number(par[key], check, f"labels.{name}.{key}", -1e6, 1e6)
        for key in ("x", "y"):
            if key in par:
                knots = par[key]
                if not isinstance(knots, list) or len(knots) > MAX_KNOTS:
                    raise check.fail(f"labels.{name}.{key}", f"not a list of at most {MAX_KNOTS} knots")
                for i, v in enumerate(knots):
                    number(v, check, f"labels.{name}.{key}[{i}]", -1e6, 1e6)
    integer(data.get("n_images"), check, "n_images")
    return data


# --------------------------------------------------------------------------------------------------
# Paths recorded in files
SAFE_FILE_NAME = re.compile(r"[\w][\w .=+,@-]{0,254}")


def file_name_in(folder: Path, recorded: Any, check: Checker, key: str) -> Path | None:
    """``folder / <name of recorded>`` when that is a regular file really inside ``folder``, else None.

    Only the recorded path's last component is kept: a run copied to another machine still finds
    its checkpoints, and ``../`` or an absolute path elsewhere reaches nothing."""
    if recorded in (None, ""):
        return None
    name = Path(text(recorded, check, key)).name
    if not SAFE_FILE_NAME.fullmatch(name):
        return None
    candidate = folder / name
    return candidate if is_inside(candidate, folder) and candidate.is_file() and not candidate.is_symlink() else None


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path``, with every link resolved, lies inside ``folder`` (also resolved)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def safe_file_stem(name: str) -> str:
    """``name`` as one file-name component: anything but letters, digits, ``-`` and ``.`` becomes ``_``,
    and a name that would start with a dot (hidden, or ``..``) gets a leading ``_``."""
    stem = "".join(c if c.isalnum() or c in "-." else "_" for c in str(name))[:120] or "_"
    return "_" + stem if stem.startswith(".") else stem


