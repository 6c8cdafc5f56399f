"""Cohort construction on the label table (pure pandas/numpy): demographic and prior-visit
metadata, patient-level splits and folds, label statistics.

Everything here works per patient, never per image: an X-ray of a patient in the test split
must not have a sibling image in training, or the test score measures patient recognition.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxr_lightning.data.nih import (
    AGE,
    FINDING_LABELS,
    FOLLOW_UP,
    IMAGE,
    MAX_AGE,
    PATIENT,
    SEX,
    TEST_LIST,
    TRAIN_VAL_LIST,
    VIEW,
)
from cxr_lightning.errors import CheckpointError, ConfigError, DataError
from cxr_lightning.labels import encode_labels

log = logging.getLogger(__name__)

DEMOGRAPHIC_COLUMNS = ("meta:age", "meta:age_missing", "meta:sex_male", "meta:view_ap")
PRIOR_PREFIX = "meta:prior:"
HAS_PRIOR = "meta:has_prior"
SPLITS = ("train", "val", "test")
_SEX_MALE = {"M": 1.0, "F": 0.0}
_VIEW_AP = {"AP": 1.0, "PA": 0.0}
# The training encoding has no code for an unknown sex or view: halfway between its two codes.
_UNKNOWN_CATEGORY = 0.5
_SHOW = 5


def encode_demographics(
    df: pd.DataFrame, age_fill: float | None = None, missing_as_unknown: bool = False
) -> tuple[pd.DataFrame, float]:
    """The four demographic ``meta:`` columns of ``df`` and the age (years) used for missing ages.

    ``age_fill=None`` uses the median of ``df``: pass the training split's value for val/test so
    that evaluation rows are imputed exactly as training rows were. ``missing_as_unknown``: a
    missing (NaN) sex or view is encoded as unknown, halfway between its two codes, as
    :func:`new_patient_metadata` does (for datasets that do not record them); otherwise it is a
    DataError, like any value outside the codes.
    """
    _require(df, (AGE, SEX, VIEW), "encode_demographics")
    age = df[AGE].astype(float)
    if age_fill is None:
        age_fill = float(age.median())
        if np.isnan(age_fill):
            raise DataError(
                f"no row of {_source(df)} has a valid {AGE} (all missing or > 100), so there is no "
                "median to impute missing ages with; fix the ages or pass age_fill."
            )
    sex_male = _encode_category(df, SEX, _SEX_MALE, missing_as_unknown)
    view_ap = _encode_category(df, VIEW, _VIEW_AP, missing_as_unknown)
    out = pd.DataFrame(
        {
            "meta:age": age.fillna(age_fill) / 100.0,
            "meta:age_missing": age.isna().astype(float),
            "meta:sex_male": sex_male,
            "meta:view_ap": view_ap,
        },
        index=df.index,
    )
    return out, float(age_fill)


def new_patient_metadata(demographics: pd.DataFrame, meta_names: Sequence[str], age_fill: float) -> np.ndarray:
    """``(N, M)`` float32 metadata, in a checkpoint's ``meta_names`` order, for images outside the
    label table: ``demographics`` has columns ``age`` (years), ``sex`` (M/F) and ``view`` (PA/AP),
    NaN/None where unknown. Encoded exactly as training encodes them; an unknown sex or view sits
    halfway between its two codes; previous-visit findings are unknown, so "no prior visit"."""
    columns = [f"meta:{n}" for n in meta_names]
    known = set(DEMOGRAPHIC_COLUMNS) | {HAS_PRIOR}
    unknown = [c for c in columns if c not in known and not c.startswith(PRIOR_PREFIX)]
    if unknown:
        raise CheckpointError(f"The checkpoint expects metadata {unknown} that cannot be built from age/sex/view.")
    sex_missing = demographics["sex"].isna().to_numpy()
    view_missing = demographics["view"].isna().to_numpy()
    table = pd.DataFrame(
        {
            IMAGE: demographics.index.astype(str),
            AGE: demographics["age"].where(demographics["age"] <= MAX_AGE),  # as nih.read_label_table does
            # placeholders, replaced below: the training encoding has no code for "unknown"
            SEX: demographics["sex"].where(~sex_missing, "M"),
            VIEW: demographics["view"].where(~view_missing, "PA"),
        }
    )
    table.attrs["source"] = "the prediction inputs"
    encoded, _ = encode_demographics(table, age_fill=age_fill)
    encoded.loc[sex_missing, "meta:sex_male"] = _UNKNOWN_CATEGORY
    encoded.loc[view_missing, "meta:view_ap"] = _UNKNOWN_CATEGORY
    # prior:* and has_prior: no previous visit is known -> 0, like a first visit in training.
    return encoded.reindex(columns=columns, fill_value=0.0).to_numpy(np.float32)


def add_prior_visits(
    df: pd.DataFrame,
    label_names: Sequence[str],
    encoded: np.ndarray | None = None,
    images_per_visit: bool = False,
) -> pd.DataFrame:
    """Copy of ``df`` with ``meta:prior:<name>`` (findings of the patient's previous visit) and
    ``meta:has_prior``. ``encoded``: ``df``'s findings already multi-hot encoded in
    ``label_names`` order (encoded here when not given); NaN (an uncertain or unknown label)
    counts as not found.

    Visits are ordered by ``Follow-up #``, not by file name (``00000003_000.png`` is patient 3's
    eighth visit). Call this on the full label table before dropping rows, so that a previous
    visit counts even when its image is not used in the run. NIH has one image per visit;
    ``images_per_visit=True`` (studies of several images, as in CheXpert or MIMIC) lets rows share
    a visit: a finding of any image of the previous visit is a prior finding.
    """
    _require(df, (IMAGE, FINDING_LABELS, PATIENT, FOLLOW_UP), "add_prior_visits")
    if encoded is None:
        encoded = encode_labels(df.set_index(IMAGE)[FINDING_LABELS], names=list(label_names), source=_source(df))
    if images_per_visit:
        return _add_prior_studies(df, label_names, np.nan_to_num(np.asarray(encoded, dtype=float)))
    visit = df[[PATIENT, FOLLOW_UP]]
    repeated = visit.duplicated(keep=False)
    if repeated.any():
        raise DataError(
            f"{_source(df)}: {int(repeated.sum())} rows share a ({PATIENT}, {FOLLOW_UP}) pair, so the "
            f"visit order is ambiguous: {_name_rows(df, repeated)}. Each visit needs its own {FOLLOW_UP}."
        )
    order = np.lexsort((df[FOLLOW_UP].to_numpy(), df[PATIENT].to_numpy()))
    ordered = df.iloc[order]
    findings = np.nan_to_num(np.asarray(encoded, dtype=float))[order]
    columns = [PRIOR_PREFIX + name for name in label_names]
    patient = ordered[PATIENT].to_numpy()
    previous = pd.DataFrame(findings, columns=columns).groupby(patient, sort=False).shift(1)
    has_prior = pd.Series(patient).groupby(patient, sort=False).cumcount().to_numpy() > 0

    # Undo the sort: row order[i] of df gets sorted row i.
    prior = np.empty((len(df), len(columns)), dtype=float)
    prior[order] = previous.fillna(0.0).to_numpy(dtype=float)
    has = np.empty(len(df), dtype=float)
    has[order] = has_prior
    out = df.copy()
    out[columns] = prior
    out[HAS_PRIOR] = has
    return out


def _add_prior_studies(df: pd.DataFrame, label_names: Sequence[str], encoded: np.ndarray) -> pd.DataFrame:
    columns = [PRIOR_PREFIX + name for name in label_names]
    visits = pd.DataFrame(encoded, columns=columns)
    visits[PATIENT], visits[FOLLOW_UP] = df[PATIENT].to_numpy(), df[FOLLOW_UP].to_numpy()
    per_visit = visits.groupby([PATIENT, FOLLOW_UP], sort=True)[columns].max()
    previous = per_visit.groupby(level=PATIENT, sort=False).shift(1)
    has_prior = per_visit.groupby(level=PATIENT, sort=False).cumcount() > 0
    previous = previous.fillna(0.0).assign(**{HAS_PRIOR: has_prior.astype(float)})
    keys = pd.MultiIndex.from_arrays([df[PATIENT].to_numpy(), df[FOLLOW_UP].to_numpy()])
    out = df.copy()
    out[columns + [HAS_PRIOR]] = previous.reindex(keys).to_numpy(dtype=float)
    return out


def complete_split(
    df: pd.DataFrame, official: pd.Series, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """``"train"``/``"val"``/``"test"`` per row, keeping a publisher's ``official`` split where it
    gives one (NaN elsewhere) and drawing the rest per patient: test patients by ``test_fraction``
    only when no row is officially test, val patients by ``val_fraction`` only when none is
    officially val; the remaining rows train.

    So CheXpert's ``valid.csv`` stays the val split and, without its test labels, test patients
    are drawn from ``train.csv``; MIMIC-CXR's ``split.csv`` is used as it is; PadChest, which ships
    no split, is split like NIH without lists.
    """
    _require(df, (IMAGE, PATIENT), "complete_split")
    official = pd.Series(official, index=df.index).astype(object)
    unknown = official.notna() & ~official.isin(SPLITS)
    if unknown.any():
        raise DataError(
            f"{_source(df)}: official split values {sorted(official[unknown].unique())} not in {list(SPLITS)}."
        )
    split = official.copy()
    pool_rows = split.isna()
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.sort(df.loc[pool_rows, PATIENT].unique()))
    draw_test = not (official == "test").any()
    draw_val = not (official == "val").any()
    _check_fractions(val_fraction if draw_val else 0.0, test_fraction if draw_test else 0.0)
    n_test = _count(test_fraction, len(pool), "test", "unsplit") if draw_test and len(pool) else 0
    n_val = _count(val_fraction, len(pool) - n_test, "val", "remaining") if draw_val and len(pool) else 0
    patient = df[PATIENT]
    split[pool_rows & patient.isin(pool[:n_test])] = "test"
    split[pool_rows & patient.isin(pool[n_test : n_test + n_val])] = "val"
    split[split.isna()] = "train"
    log.info("official split kept for %d images; drawn (seed %d): %d test, %d val patients of %d",
             int((~pool_rows).sum()), seed, n_test, n_val, len(pool))
    split = split.rename("split")
    check_patient_disjoint(df.assign(split=split), "split")
    return split


def split_by_patient(
    df: pd.DataFrame,
    lists: tuple[set[str], set[str]] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.Series:
    """``"train"``/``"val"``/``"test"`` for each row, assigned per patient.

    With NIH's official ``lists = (train_val, test)`` the test split is exactly the test list and
    validation patients are drawn (seeded) from train_val; ``test_fraction`` is then unused.
    Without lists, patients are drawn into test and val by the two fractions.
    """
    _require(df, (IMAGE, PATIENT), "split_by_patient")
    _check_fractions(val_fraction, test_fraction if lists is None else 0.0)
    rng = np.random.default_rng(seed)
    patient = df[PATIENT]
    split = pd.Series("train", index=df.index, name="split", dtype=object)

    if lists is not None:
        train_val, test = lists
        in_test, in_train_val = df[IMAGE].isin(test), df[IMAGE].isin(train_val)
        neither = ~(in_test | in_train_val)
        if neither.any():
            raise DataError(
                f"{int(neither.sum())} images of {_source(df)} are in neither {TRAIN_VAL_LIST} nor "
                f"{TEST_LIST}: {_name_rows(df, neither)}. The lists must come from the same NIH release "
                "as the table; remove both list files to use seeded patient splits instead."
            )
        split[in_test] = "test"
        try:
            check_patient_disjoint(df.assign(split=split), "split")
        except DataError as exc:
            raise DataError(f"{TRAIN_VAL_LIST} and {TEST_LIST} do not separate patients: {exc}") from None
        pool = np.sort(patient[~in_test].unique())
        val_patients = rng.permutation(pool)[: _count(val_fraction, len(pool), "val", "train_val")]
        split[~in_test & patient.isin(val_patients)] = "val"
        log.info("official split: test = %s, val = %d of %d train_val patients (seed %d)",
                 TEST_LIST, len(val_patients), len(pool), seed)
    else:
        pool = rng.permutation(np.sort(patient.unique()))
        n_test = _count(test_fraction, len(pool), "test", "all")
        n_val = _count(val_fraction, len(pool) - n_test, "val", "remaining")
        split[patient.isin(pool[:n_test])] = "test"
        split[patient.isin(pool[n_test : n_test + n_val])] = "val"
        log.info("seeded patient split (seed %d): %d test, %d val, %d train patients",
                 seed, n_test, n_val, len(pool) - n_test - n_val)

    check_patient_disjoint(df.assign(split=split), "split")
    return split


def check_patient_disjoint(df: pd.DataFrame, split_col: str = "split") -> None:
    """Raise :class:`DataError` naming the patients whose images fall in more than one split."""
    _require(df, (PATIENT, split_col), "check_patient_disjoint")
    spans = df.groupby(PATIENT)[split_col].nunique()
    shared = spans.index[spans > 1]
    if len(shared):
        shown = df[df[PATIENT].isin(shared[:_SHOW])].groupby(PATIENT)[split_col].unique()
        described = ", ".join(f"patient {p} in {sorted(s)}" for p, s in shown.items())
        more = f" and {len(shared) - _SHOW} more" if len(shared) > _SHOW else ""
        raise DataError(
            f"{len(shared)} patient(s) have images in more than one split ({described}{more}); "
            "all images of a patient must be in the same split."
        )


def patient_folds(df_trainval: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """Fold id (0..folds-1) per row; every patient's images share one fold (fold k validates run k)."""
    _require(df_trainval, (PATIENT,), "patient_folds")
    if folds < 2:
        raise ConfigError(f"cross-validation needs folds >= 2, got {folds}.")
    patients = np.sort(df_trainval[PATIENT].unique())
    if folds > len(patients):
        raise DataError(f"cannot make {folds} patient folds from {len(patients)} patients; lower the fold count.")
    shuffled = np.random.default_rng(seed).permutation(patients)
    fold_of = pd.Series(np.arange(len(shuffled)) % folds, index=shuffled)
    return df_trainval[PATIENT].map(fold_of).astype("int64").rename("fold")


def label_statistics(labels: np.ndarray | pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Positive/negative counts and fractions per label (index: names), over the images that
    observe each label (a NaN label is unobserved).

    A DataFrame may hold the labels as ``<name>`` or ``label:<name>`` columns.
    """
    names = list(names)
    if isinstance(labels, pd.DataFrame):
        columns = [n if n in labels.columns else f"label:{n}" for n in names]
        absent = [c for c in columns if c not in labels.columns]
        if absent:
            raise DataError(f"label statistics: no column for {absent}; columns are {list(labels.columns)}.")
        values = labels[columns].to_numpy(dtype=float)
    else:
        values = np.asarray(labels, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise DataError(f"label statistics: labels of shape {values.shape} do not match {len(names)} names.")
    if len(values) == 0:
        raise DataError("label statistics: no rows (is the training split empty?).")
    # NaN: a label not observed for that image (uncertain under data.uncertain=ignore, or a
    # label the dataset lacks); fractions are over the images that observe the label.
    observed = ~np.isnan(values)
    n_pos = (values > 0.5).sum(axis=0)
    n_neg = (values <= 0.5).sum(axis=0)
    n = observed.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {"n_pos": n_pos, "n_neg": n_neg, "pos_frac": n_pos / n, "neg_frac": n_neg / n},
            index=pd.Index(names, name="label"),
        )


# --- helpers -------------------------------------------------------------------------------------


def _source(df: pd.DataFrame) -> str:
    return str(df.attrs.get("source", "the label table"))


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: {_source(df)} lacks column(s) {missing}; columns are {list(df.columns)}.")


def _name_rows(df: pd.DataFrame, mask: pd.Series) -> str:
    names = df.loc[mask, IMAGE] if IMAGE in df.columns else df.index[mask.to_numpy()].to_series()
    more = f" and {int(mask.sum()) - _SHOW} more" if mask.sum() > _SHOW else ""
    return ", ".join(map(str, names.iloc[:_SHOW])) + more


def _encode_category(
    df: pd.DataFrame, col: str, codes: dict[str, float], missing_as_unknown: bool = False,
) -> pd.Series:
    text = df[col].astype("string").str.strip().str.upper()
    encoded = text.map(codes).astype(float)
    if missing_as_unknown:
        encoded = encoded.where(text.notna(), _UNKNOWN_CATEGORY)
    unknown = encoded.isna()
    if unknown.any():
        values = sorted(df.loc[unknown, col].astype(str).unique())
        raise DataError(
            f"{_source(df)}: {int(unknown.sum())} row(s) with {col} {values[:_SHOW]} not in "
            f"{sorted(codes)}: {_name_rows(df, unknown)}. Fix those rows or drop them from the table."
        )
    return encoded


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training patients."
        )


def _count(fraction: float, n_patients: int, split: str, pool: str) -> int:
    """Patients to draw: at least one when the fraction is positive, never the whole pool."""
    if fraction == 0.0:
        return 0
    n = max(1, round(fraction * n_patients))
    if n >= n_patients:
        raise DataError(
            f"only {n_patients} {pool} patient(s): a {split} fraction of {fraction} leaves none for "
            "training; add data or lower the fraction."
        )
    return n
