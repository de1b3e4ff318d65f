"""The comparison table: per-model mean and standard deviation over seeds, as Markdown, CSV and JSON.

One row per model (mome_rec over-arches, then the torch-rechub peers). The
columns are each task's test AUC and log loss, the average test AUC over the
tasks, the deployed size in MB and the training time in seconds. Each cell is
``mean ± standard deviation`` over the seeds (the sample standard deviation,
``ddof = 1``; a single seed shows the mean alone). The best mean of each
column is bold: the highest AUC, the lowest log loss, size and time.

Example::

    rows = [summarize_row("mmoe", "mome_rec", records)]
    markdown = markdown_table(rows, tasks=["income", "never_married"])
"""

import csv
import dataclasses
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Column:
    """One numeric column of the table.

    Attributes:
        key: the key in :attr:`Row.values` and the CSV header stem.
        header: the Markdown header.
        higher_is_better: whether the largest mean is bold (else the smallest).
        digits: decimals shown in Markdown.
    """

    key: str
    header: str
    higher_is_better: bool
    digits: int


@dataclasses.dataclass
class Row:
    """One model's line of the table.

    Attributes:
        model: the over-arch name (``mmoe``) or the peer's label (``torch-rechub MMOE``).
        source: ``mome_rec`` or the peer library with its version.
        lambda_neuron, lambda_expert: the chosen lambda_1 and lambda_2, None where unused.
        seeds: number of seeds the statistics cover.
        values: column key -> ``(mean, standard deviation)``; absent when unknown.
        note: text shown instead of values (a peer that is not installed).
    """

    model: str
    source: str
    lambda_neuron: Optional[float] = None
    lambda_expert: Optional[float] = None
    seeds: int = 0
    values: Dict[str, Tuple[float, float]] = dataclasses.field(default_factory=dict)
    note: str = ""


def table_columns(tasks: Sequence[str]) -> List[Column]:
    """Return the columns for ``tasks``: AUC and log loss per task, then average AUC, size and time."""
    columns: List[Column] = []
    for task in tasks:
        columns.append(Column(f"{task}_auc", f"{task} AUC", True, 4))
        columns.append(Column(f"{task}_logloss", f"{task} logloss", False, 4))
    columns.append(Column("average_auc", "average AUC", True, 4))
    columns.append(Column("size_mb", "size MB", False, 3))
    columns.append(Column("train_seconds", "train s", False, 0))
    return columns


def record_values(record: Mapping[str, Any], tasks: Sequence[str]) -> Dict[str, Optional[float]]:
    """Return the column values of one run record (see :func:`mome_rec.compare.run_record`)."""
    values: Dict[str, Optional[float]] = {}
    for task in tasks:
        metrics = record["test"].get(task, {})
        values[f"{task}_auc"] = metrics.get("auc")
        values[f"{task}_logloss"] = metrics.get("logloss")
    values["average_auc"] = record.get("test_average_auc")
    values["size_mb"] = record.get("size_mb")
    values["train_seconds"] = record.get("train_seconds")
    return values


def mean_std(values: Sequence[Optional[float]]) -> Optional[Tuple[float, float]]:
    """Return the mean and sample standard deviation (``ddof = 1``, 0 for one value) of the defined values."""
    defined = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    if not defined:
        return None
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    return float(np.mean(defined)), std


def summarize_row(
    model: str,
    source: str,
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    lambda_neuron: Optional[float] = None,
    lambda_expert: Optional[float] = None,
) -> Row:
    """Aggregate the run records of one model (one per seed) into a row."""
    per_record = [record_values(record, tasks) for record in records]
    values: Dict[str, Tuple[float, float]] = {}
    for column in table_columns(tasks):
        summary = mean_std([values_of_run[column.key] for values_of_run in per_record])
        if summary is not None:
            values[column.key] = summary
    return Row(model, source, lambda_neuron, lambda_expert, len(records), values)


def best_means(rows: Sequence[Row], columns: Sequence[Column]) -> Dict[str, float]:
    """Return column key -> the best mean over the rows, rounded as shown in Markdown."""
    best: Dict[str, float] = {}
    for column in columns:
        means = [round(row.values[column.key][0], column.digits) for row in rows if column.key in row.values]
        if means:
            best[column.key] = max(means) if column.higher_is_better else min(means)
    return best


def format_cell(value: Tuple[float, float], digits: int, seeds: int) -> str:
    """Return ``mean ± std`` with ``digits`` decimals, or the mean alone for one seed or a zero deviation."""
    mean, std = value
    if seeds > 1 and round(std, digits) > 0:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def format_lambda(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:g}"


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """Return the table as GitHub Markdown, the best mean of each column in bold."""
    columns = table_columns(tasks)
    best = best_means(rows, columns)
    header = ["model", "source", "λ1", "λ2"] + [column.header for column in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * len(columns)) + " |"]
    for row in rows:
        cells = [row.model, row.source, format_lambda(row.lambda_neuron), format_lambda(row.lambda_expert)]
        if row.note:
            cells += [row.note] + [""] * (len(columns) - 1)
        else:
            for column in columns:
                if column.key not in row.values:
                    cells.append("n/a")
                    continue
                text = format_cell(row.values[column.key], column.digits, row.seeds)
                if round(row.values[column.key][0], column.digits) == best.get(column.key):
                    text = f"**{text}**"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """Return the table as CSV: one line per model, ``KEY_mean`` and ``KEY_std`` per column."""
    columns = table_columns(tasks)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["model", "source", "lambda_neuron", "lambda_expert", "seeds", "note"]
    for column in columns:
        header += [f"{column.key}_mean", f"{column.key}_std"]
    writer.writerow(header)
    for row in rows:
        line: List[Any] = [row.model, row.source, _blank(row.lambda_neuron), _blank(row.lambda_expert), row.seeds, row.note]
        for column in columns:
            mean, std = row.values.get(column.key, (None, None))
            line += [_blank(mean), _blank(std)]
        writer.writerow(line)
    return buffer.getvalue()


def row_to_dict(row: Row) -> Dict[str, Any]:
    """Return a JSON-serialisable copy of ``row``, each value as ``{"mean": m, "std": s}``."""
    result = dataclasses.asdict(row)
    result["values"] = {key: {"mean": mean, "std": std} for key, (mean, std) in row.values.items()}
    return result


def _blank(value: Optional[float]) -> Any:
    return "" if value is None else repr(float(value))
