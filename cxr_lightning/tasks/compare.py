"""Compare the runs of a sweep: ``python -m cxr_lightning.compare DIR [--by backbone,head]``.

Reads every run directory under ``DIR`` (its ``config.yaml``, ``metrics.json`` and
``history.csv``, as written by :func:`cxr_lightning.train.train`) and writes three files into
``DIR`` (or ``--out``):

* ``comparison.csv``: one row per group (by default per backbone) with the mean, standard
  deviation and count over the group's runs (seeds or folds) of every metric;
* ``comparison.md``: the same as readable tables, per-finding test AUROC, and every run with its
  status: a run without ``metrics.json`` is listed as failed, with the reason when the sweep
  callback recorded one (``error.txt``);
* ``comparison.png``: mean test AUROC per group with standard-deviation error bars, and the
  validation-loss curve of every run;
* ``comparison.html``: the tables and the figure as one self-contained page for a browser.

``cxr_lightning.sweep.CompareOnMultirunEnd`` calls :func:`write_comparison` when a Hydra sweep
ends, so a sweep leaves these files in its directory by itself.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr_lightning import schema
from cxr_lightning.errors import DataError
from cxr_lightning.evaluation import html
from cxr_lightning.evaluation.report import md
from cxr_lightning.files import atomic_path, write_csv, write_text
from cxr_lightning.run_dir import EVALUATION, EXPLAIN, HYDRA_CONFIG, METRICS, RUN_CONFIG, RunDir
from cxr_lightning.selection import LOSS_SCALED

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

OUTPUT_STEM = "comparison"

DEFAULT_BY: tuple[str, ...] = ("backbone",)
# metrics.json key -> heading in the report, in report order.
SUMMARY_METRICS: dict[str, str] = {
    "params": "parameters",
    "best_val_loss": "best val loss",
    "test.auroc_mean": "test AUROC",
    # A linear probe's (python -m cxr_lightning.probe) patient-bootstrap interval, in its metrics.json.
    "test.auroc_mean_lower": "test AUROC CI low (probe)",
    "test.auroc_mean_upper": "test AUROC CI high (probe)",
    "test.f1_macro": "test macro F1",
    "epochs": "epochs",
    "seconds_per_epoch": "s / epoch",
    "train_images_per_second": "train images / s",
    "boxes_trained_on": "boxes trained on",
    # From <run>/evaluation/metrics.json (python -m cxr_lightning.evaluate run_dir=RUN), when present.
    "evaluation.auroc_mean": "test AUROC (evaluate)",
    "evaluation.auroc_mean_lower": "test AUROC CI low",
    "evaluation.auroc_mean_upper": "test AUROC CI high",
    # From <run>/explain/metrics.json (python -m cxr_lightning.explain run_dir=RUN), when present.
    "explain.localization.pointing_game": "pointing game",
    "explain.localization.random_pointing_game": "pointing game, random",
    "explain.localization.iobb@0.5": "IoBB@0.5",
    "explain.localization.random_iobb@0.5": "IoBB@0.5, random",
    # Blank class maps among the scored (image, finding) pairs: what a collapsing box term leaves.
    "explain.localization.empty": "empty maps",
    "explain.localization.n_pairs": "scored pairs",
}
# The jobs run on a finished run whose metrics.json a comparison reads too, under their prefix.
RUN_JOBS: dict[str, str] = {"evaluation": EVALUATION, "explain": EXPLAIN}
AUROC_PREFIX = "test.auroc."
# A pooled run's test mean AUROC per source (over the labels that source scores).
SOURCE_PREFIX = "test.source_auroc."
UNSET = "?"  # group value of a run whose config lacks the key or cannot resolve it


@dataclass(frozen=True)
class ComparisonFiles:
    csv: Path
    markdown: Path
    figure: Path
    page: Path


# ----------------------------------------------------------------------------------------------
# Reading runs
def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every run directory under ``sweep_dir`` (itself included): one holding a run config."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass the sweep (multirun) directory to compare.")
    hydra_folder = Path(HYDRA_CONFIG).parent.name
    candidates = {p.parent for p in root.rglob(RUN_CONFIG) if p.parent.name != hydra_folder}
    candidates |= {p.parent.parent for p in root.rglob(HYDRA_CONFIG)}
    # evaluate/explain write their own .hydra/ inside the run they score: part of it, not runs.
    return sorted(c for c in candidates if not (c.name in RUN_JOBS.values() and c.parent in candidates))


def read_runs(sweep_dir: str | Path, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """One row per run: ``run`` (path relative to ``sweep_dir``), ``status`` (``ok``/``failed``),
    ``reason``, one column per ``by`` key, ``seed``, ``fold``, every numeric metric of its
    ``metrics.json`` and ``history`` (the path of its ``history.csv``, or None)."""
    root = Path(sweep_dir)
    by = _check_by(by)
    run_dirs = find_runs(root)
    if not run_dirs:
        raise DataError(
            f"no runs under {root}: no */{RUN_CONFIG} or */{HYDRA_CONFIG}. Pass the directory a sweep "
            "(python -m cxr_lightning.train -m ...) wrote, e.g. outputs/<task>/multirun_<time>."
        )
    rows = [_read_run(root, d, by) for d in run_dirs]
    runs = pd.DataFrame(rows)
    for key in by:
        if (runs[key] == UNSET).all():
            raise DataError(
                f"--by {key}: no run under {root} has config key {key!r}; use config keys such as "
                "backbone, head, loss, seed, data.image_size or optimizer.lr."
            )
    return runs


def _check_by(by: Sequence[str] | str) -> list[str]:
    keys = [k.strip() for k in (by.split(",") if isinstance(by, str) else by) if k.strip()]
    if not keys:
        raise DataError("--by needs at least one config key, e.g. --by backbone or --by backbone,head.")
    reserved = {"run", "status", "reason", "history"}
    if reserved & set(keys):
        raise DataError(f"--by {','.join(keys)}: {sorted(reserved & set(keys))} name report columns, not config keys.")
    return keys


def _read_run(root: Path, run_dir: Path, by: Sequence[str]) -> dict[str, Any]:
    run = RunDir(run_dir)
    config_path = run.config if run.config.is_file() else run.hydra_config
    cfg = read_run_config(config_path)
    row: dict[str, Any] = {
        "run": run_dir.relative_to(root).as_posix() if run_dir != root else ".",
        **{key: _group_value(cfg, key) for key in by},
        "seed": _config_scalar(cfg, "seed"),
        # The train_val fold, or NIH's boxed-image protocol's (data.boxes.fold): compare aggregates
        # a group's folds either way.
        "fold": _fold(cfg),
        "history": str(run.history) if run.history.is_file() else None,
        "data_source": _select(cfg, "data.source"),
    }
    metrics_path = run.metrics
    if not metrics_path.is_file():
        return {**row, "status": "failed", "reason": _failure_reason(run_dir)}
    try:
        metrics = schema.mapping(schema.read_json(metrics_path, schema.Checker(str(metrics_path), DataError)),
                                 schema.Checker(str(metrics_path), DataError), "")
    except DataError as exc:
        return {**row, "status": "failed", "reason": f"unreadable {METRICS}: {exc}"}
    for prefix, folder in RUN_JOBS.items():
        job_metrics = run.root / folder / METRICS
        if job_metrics.is_file():
            check = schema.Checker(str(job_metrics), DataError)
            try:
                job = schema.mapping(schema.read_json(job_metrics, check), check, "")
                metrics |= {f"{prefix}.{k}": v for k, v in job.items()}
            except DataError as exc:
                log.warning("ignoring unreadable %s: %s", job_metrics, exc)
    numeric = {k: _number(v) for k, v in metrics.items() if k in SUMMARY_METRICS or k.startswith(AUROC_PREFIX)}
    per_source = metrics.get("per_source") if isinstance(metrics.get("per_source"), dict) else {}
    if not per_source and metrics.get("evaluation.split") == "test" and not metrics.get("evaluation.external"):
        # trained with test_after_fit=false, then evaluated: the same per-source test figures
        evaluated = metrics.get("evaluation.per_source")
        per_source = evaluated if isinstance(evaluated, dict) else {}
    numeric |= {f"{SOURCE_PREFIX}{name}": _number(v.get("auroc_mean")) for name, v in per_source.items()
                if isinstance(v, dict)}
    selection = metrics.get("selection") or {"metric": "val/loss"}  # runs before selection.metric chose by loss
    metric = selection.get("metric") if isinstance(selection, dict) else None
    return {**row, "status": "ok", "reason": "", "loss_name": _group_value(cfg, "loss"),
            "selection_metric": metric if isinstance(metric, str) else "val/loss", **numeric}


def _fold(cfg: DictConfig) -> float:
    fold = _config_scalar(cfg, "data.fold")
    return fold if not math.isnan(fold) else _config_scalar(cfg, "data.boxes.fold")


def _failure_reason(run_dir: Path) -> str:
    error = RunDir(run_dir).error
    if error.is_file():
        with open(error, encoding="utf-8", errors="replace") as fh:
            lines = fh.read(4096).strip().splitlines()
        return lines[0] if lines else f"no {METRICS}"
    return f"no {METRICS} (crashed, killed or still running)"


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's config as plain data: YAML read safely, under a size limit, its ``${...}``
    interpolations left as the text they are (resolving them would read the environment or other
    files on this machine for a directory someone else made)."""
    import yaml

    check = schema.Checker(f"run config {path}", DataError)
    try:
        if path.stat().st_size > schema.MAX_JSON_BYTES:
            raise check.fail("", "too large for a run config")
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 -- OSError, UnicodeError and every YAML error
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {first}") from None
    return schema.mapping(schema.plain_data(tree if tree is not None else {}, check), check, "")


def _select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _group_value(cfg: dict[str, Any], key: str) -> str:
    node = _select(cfg, key)
    if isinstance(node, dict):
        # A config group (backbone, head, loss): its name says which option was chosen.
        node = node.get("name")
    if node is None or isinstance(node, (dict, list)):
        return UNSET
    return str(node)


def _config_scalar(cfg: dict[str, Any], key: str) -> float:
    return _number(_select(cfg, key))


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


# ----------------------------------------------------------------------------------------------
# Summarising
def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The metric columns of a run table in report order: summary metrics, then per-finding AUROC."""
    summary = [c for c in SUMMARY_METRICS if c in runs.columns]
    return summary + [c for c in runs.columns if c.startswith((AUROC_PREFIX, SOURCE_PREFIX))]


def summarize(runs: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """One row per group: ``n_runs`` (finished), ``n_failed``, ``seeds``, ``folds`` and, per metric,
    ``<metric>_mean``, ``<metric>_std`` (sample standard deviation, NaN for one run) and
    ``<metric>_n`` (runs with a value). Sorted by mean test AUROC, best first."""
    by = _check_by(by)
    flags = runs.assign(_ok=runs["status"] == "ok", _failed=runs["status"] == "failed")
    summary = flags.groupby(by, sort=True).agg(
        n_runs=("_ok", "sum"), n_failed=("_failed", "sum"), seeds=("seed", _distinct), folds=("fold", _distinct)
    )
    ok = runs[runs["status"] == "ok"]
    metrics = metric_columns(runs)
    if metrics and not ok.empty:
        stats = ok.groupby(by, sort=True)[metrics].agg(["mean", "std", "count"])
        stats.columns = [f"{m}_{'n' if s == 'count' else s}" for m, s in stats.columns]
        summary = summary.join(stats, how="left")
        counts = [f"{m}_n" for m in metrics]
        summary[counts] = summary[counts].fillna(0).astype(int)  # groups whose runs all failed
    order_key = "test.auroc_mean_mean"
    if order_key in summary.columns:
        summary = summary.sort_values(order_key, ascending=False, na_position="last", kind="stable")
    return summary.reset_index()


def _distinct(values: pd.Series) -> str:
    present = np.unique(values.dropna().to_numpy())
    return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in present)


# ----------------------------------------------------------------------------------------------
# Writing
def write_comparison(
    sweep_dir: str | Path, by: Sequence[str] | str = DEFAULT_BY, out_dir: str | Path | None = None
) -> ComparisonFiles:
    """Read the runs under ``sweep_dir`` and write ``comparison.{csv,md,png,html}`` into ``out_dir``
    (default: ``sweep_dir``); returns their paths."""
    by = _check_by(by)
    runs = read_runs(sweep_dir, by)
    summary = summarize(runs, by)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    files = ComparisonFiles(
        csv=out / f"{OUTPUT_STEM}.csv", markdown=out / f"{OUTPUT_STEM}.md", figure=out / f"{OUTPUT_STEM}.png",
        page=out / f"{OUTPUT_STEM}.html",
    )
    write_csv(summary, files.csv, index=False)
    write_text(files.markdown, render_markdown(runs, summary, by, Path(sweep_dir), files.figure.name))
    with atomic_path(files.figure) as tmp:
        plot_comparison(runs, summary, by, tmp)
    write_text(files.page, render_html(runs, summary, by, Path(sweep_dir), files.figure))
    n_failed = int((runs["status"] == "failed").sum())
    log.info(
        "Compared %d run(s) (%d failed) by %s: %s, %s, %s, %s",
        len(runs), n_failed, ",".join(by), files.csv, files.markdown, files.figure, files.page,
    )
    return files


def render_markdown(runs: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str], sweep_dir: Path, figure: str) -> str:
    lines = [
        f"# Comparison of {sweep_dir.name or sweep_dir}",
        "",
        _intro(runs, by, sweep_dir),
        "",
        f"![comparison]({figure})",
        "",
    ]
    for heading, headers, rows, note in report_tables(runs, summary, by):
        lines += ([f"## {heading}", ""] if heading else []) + _markdown_table(headers, rows) + [""]
        lines += [note, ""] if note else []
    return "\n".join(lines[:-1]) + "\n"


def render_html(runs: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str], sweep_dir: Path, figure: Path) -> str:
    """``comparison.html``: the tables of ``comparison.md`` and its figure in one self-contained page."""
    sections = [("overview", "Overview", f"<p>{html.esc(_intro(runs, by, sweep_dir).replace('`', ''))}</p>"
                 + html.figure(figure, "Mean test AUROC per group; validation loss of every run"))]
    for k, (heading, headers, rows, note) in enumerate(report_tables(runs, summary, by)):
        cells = [[str(c).strip("`") for c in row] for row in rows]
        body = html.table(pd.DataFrame(cells, columns=headers)) + (f"<p>{html.esc(note)}</p>" if note else "")
        sections.append((f"table-{k}", heading or "Groups", body))
    demo = (runs["data_source"] == "demo").any()
    subtitle = html.esc(f"{len(runs)} run(s) under {sweep_dir}") + (f" · {html.esc(html.DEMO_NOTE)}" if demo else "")
    return html.page(f"Comparison of {sweep_dir.name or sweep_dir}", subtitle, sections)


def _intro(runs: pd.DataFrame, by: Sequence[str], sweep_dir: Path) -> str:
    n_ok = int((runs["status"] == "ok").sum())
    n_failed = len(runs) - n_ok
    seeds, folds = _distinct(runs["seed"]), _distinct(runs["fold"])
    spread = [f"seeds {seeds}" if seeds else "", f"folds {folds}" if folds else ""]
    return (
        f"{len(runs)} run(s) under `{sweep_dir}`: {n_ok} finished, {n_failed} failed. "
        f"Grouped by {', '.join(by)}; each cell is the mean ± sample standard deviation over the "
        f"group's finished runs ({'; '.join(s for s in spread if s) or 'one configuration each'}), "
        "n = finished runs."
    )


def report_tables(
    runs: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str]
) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The report's tables as ``(heading, headers, rows of cells, note)``: groups, per-finding AUROC, runs."""
    headers = [*by, "n", "failed", *(SUMMARY_METRICS[m] for m in SUMMARY_METRICS if f"{m}_mean" in summary)]
    body = [
        [
            *(str(row[k]) for k in by),
            str(int(row["n_runs"])),
            str(int(row["n_failed"])),
            *(_cell(row, m) for m in SUMMARY_METRICS if f"{m}_mean" in summary),
        ]
        for _, row in summary.iterrows()
    ]
    # A loss-scale warning belongs under the table whose "best val loss" column it qualifies.
    tables = [("", headers, body, " ".join(_loss_scale_warning(runs)))]

    aurocs = [c for c in metric_columns(runs) if c.startswith(AUROC_PREFIX)]
    if aurocs:
        group_names = [_group_label(row, by) for _, row in summary.iterrows()]
        per_label = [
            [m.removeprefix(AUROC_PREFIX), *(_cell(row, m) for _, row in summary.iterrows())] for m in aurocs
        ]
        tables.append(("Test AUROC per finding", ["finding", *group_names], per_label,
                       "NaN: the test split has no positive (or no negative) case of the finding."))
    by_source = [c for c in metric_columns(runs) if c.startswith(SOURCE_PREFIX)]
    if by_source:
        group_names = [_group_label(row, by) for _, row in summary.iterrows()]
        per_source = [
            [m.removeprefix(SOURCE_PREFIX), *(_cell(row, m) for _, row in summary.iterrows())] for m in by_source
        ]
        tables.append(("Test mean AUROC per source (pooled runs)", ["source", *group_names], per_source,
                       "Each source's mean is over the labels it scores (metrics.json lists them): two sources' "
                       "means compare only over the labels both score."))

    run_rows = [
        [
            f"`{r['run']}`",
            r["status"],
            *(str(r[k]) for k in by),
            _fmt_int(r["seed"]),
            _fmt_int(r["fold"]),
            _fmt("test.auroc_mean", r.get("test.auroc_mean", math.nan)),
            _fmt("best_val_loss", r.get("best_val_loss", math.nan)),
            _fmt("epochs", r.get("epochs", math.nan)),
            r["reason"],
        ]
        for _, r in runs.iterrows()  # one line per run for the report: tens of rows, not data
    ]
    tables.append(("Runs", ["run", "status", *by, "seed", "fold", "test AUROC", "best val loss", "epochs", "failure"],
                   run_rows, ""))
    return tables


def _loss_scale_warning(runs: pd.DataFrame) -> list[str]:
    """A warning when runs of different losses were selected (or would be ranked) by their loss values."""
    finished = runs[runs["status"] == "ok"]
    if "loss_name" not in finished or finished["loss_name"].nunique() < 2:
        return []
    by_loss = sorted(set(finished["selection_metric"]) & LOSS_SCALED)
    if not by_loss and "best_val_loss" not in finished:
        return []
    return [
        f"**Warning:** these runs were trained with different losses "
        f"({md(', '.join(sorted(finished['loss_name'].unique())))}). "
        "Their validation losses are on different scales, so the `best val loss` column does not rank them"
        + (f", and their best checkpoints were chosen by {', '.join(by_loss)}" if by_loss else "")
        + ". Compare them by test AUROC and select with selection.metric=val/auroc_mean.",
        "",
    ]


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def escape(cell: Any) -> str:
        # Run folders, config values and failure reasons come from the runs' files: inert text; a run
        # is shown as a code span, which this keeps whole.
        text = str(cell)
        if len(text) > 1 and text.startswith("`") and text.endswith("`"):
            return f"`{md(text[1:-1])}`"
        return md(text)

    out = ["| " + " | ".join(escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return out


_DECIMALS = {"params": 0, "best_val_loss": 4, "epochs": 1, "seconds_per_epoch": 1, "train_images_per_second": 1}


def _fmt(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if metric == "params":
        return f"{value / 1e6:.2f} M"
    return f"{value:.{_DECIMALS.get(metric, 3)}f}"


def _fmt_int(value: float) -> str:
    return "" if value is None or math.isnan(value) else str(int(value))


def _cell(row: pd.Series, metric: str) -> str:
    mean, std, n = row.get(f"{metric}_mean"), row.get(f"{metric}_std"), row.get(f"{metric}_n", 0)
    if not n:
        return "NaN"
    text = _fmt(metric, mean)
    if n > 1 and not math.isnan(std):
        text += f" ± {_fmt(metric, std)}"
    if n != row["n_runs"]:
        text += f" (n={int(n)})"
    return text


def _group_label(row: pd.Series, by: Sequence[str]) -> str:
    return " / ".join(str(row[k]) for k in by)


def plot_comparison(runs: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str], path: Path) -> None:
    """Left: mean test AUROC per group (error bars: standard deviation); right: validation loss
    per epoch of every run with a history, coloured by group (failed runs dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [_group_label(row, by) for _, row in summary.iterrows()]
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")

    mean = summary.get("test.auroc_mean_mean", pd.Series(np.nan, index=summary.index)).to_numpy(float)
    std = summary.get("test.auroc_mean_std", pd.Series(np.nan, index=summary.index)).to_numpy(float)
    n = summary.get("test.auroc_mean_n", pd.Series(0, index=summary.index)).to_numpy(int)
    x = np.arange(len(labels))
    ax_auc.bar(x, np.nan_to_num(mean), yerr=np.nan_to_num(std), capsize=4, color=[colours[lb] for lb in labels])
    for xi, m, k in zip(x, mean, n):
        ax_auc.annotate(f"n={k}", (xi, 0 if math.isnan(m) else m), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax_auc.set_xticks(x, labels, rotation=30, ha="right")
    ax_auc.set_ylabel("test mean AUROC")
    ax_auc.set_ylim(0.0, 1.0)
    ax_auc.set_title(f"Test mean AUROC by {', '.join(by)} (± std)")
    ax_auc.legend(loc="lower right", fontsize=8)

    seen: set[str] = set()
    for _, run in runs[runs["history"].notna()].iterrows():  # one curve per run: tens of runs
        curve = _val_loss_curve(Path(run["history"]))
        if curve is None:
            continue
        label = _group_label(run, by)
        ax_loss.plot(
            curve.index, curve.to_numpy(), marker="o", ms=3, lw=1.2, color=colours.get(label, "black"),
            ls="--" if run["status"] == "failed" else "-", label=None if label in seen else label,
        )
        seen.add(label)
    ax_loss.set_xlabel("epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("validation loss")
    if seen and all(line.get_ydata().min() > 0 for line in ax_loss.get_lines()):
        ax_loss.set_yscale("log")  # one diverging first epoch would flatten every other curve
    ax_loss.set_title("Validation loss per run (dashed: failed)")
    if seen:
        ax_loss.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _val_loss_curve(history: Path) -> pd.Series | None:
    try:
        table = pd.read_csv(history)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        log.warning("Leaving %s out of the loss plot: cannot read it (%s)", history, exc)
        return None
    if not {"epoch", "val/loss"} <= set(table.columns):
        log.warning("Leaving %s out of the loss plot: it has no epoch and val/loss columns", history)
        return None
    return table.set_index("epoch")["val/loss"].dropna()
