"""A batch's rows as the user wrote them: CSV and JSONL manifests and `--coeffs` globs read into
`ManifestRow`s (paths made relative to the manifest's folder, a bad cell failing its row alone, an unknown
column failing the manifest), and shards of them. No row is checked or rendered here (`batch_plan`,
`batch`)."""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import SfrError
from .options import column_rows

ROW_FIELDS = tuple(row.name for row in column_rows())
PATH_FIELDS = tuple(row.name for row in column_rows() if row.path)
REQUIRED_FIELDS = tuple(row.name for row in column_rows() if row.required)
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ManifestError(SfrError):
    """The manifest as a whole cannot be used (unreadable, no header, unknown columns): a usage error."""


@dataclass
class ManifestRow:
    """One clip as the manifest wrote it: `number` counts data rows from 1; `values` are the raw cells
    (relative paths already made relative to the manifest's folder); `error` a parse failure."""

    number: int
    values: Dict[str, object]
    error: Optional[str] = None



# ---------------------------------------------------------------------------------------------------
# Reading rows


def manifest_format(path: Path) -> str:
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ManifestError(f"{path}: unknown manifest type '{path.suffix}'; use .csv (with a header row) "
                            "or .jsonl (one JSON object per line)")
    return kind


def read_manifest(path: Path, default_source: Optional[str] = None) -> List[ManifestRow]:
    """The rows of a CSV (header row) or JSONL manifest; relative paths are taken from the manifest's
    folder (`default_source`, from the command line, is used as given for rows without a source). A row
    that cannot be parsed comes back with its `error`; the manifest as a whole failing (unreadable, no
    header, unknown column) raises ManifestError."""
    path = Path(path)
    kind = manifest_format(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from exc
    rows = _csv_rows(path, text) if kind == "csv" else _jsonl_rows(path, text)
    if not rows:
        raise ManifestError(f"{path}: no rows; write one row per clip (coeffs and source at least)"
                            + (" under the header row" if kind == "csv" else ", one JSON object per line"))
    base = path.parent
    for row in rows:
        for name in PATH_FIELDS:
            value = row.values.get(name)
            if isinstance(value, str) and value:
                row.values[name] = str(base / Path(value).expanduser())
        if default_source is not None and not row.values.get("source"):
            row.values["source"] = default_source
        if row.error is None:
            row.error = _check_cells(row.values)
    return rows


def _csv_rows(path: Path, text: str) -> List[ManifestRow]:
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise ManifestError(f"{path}: empty manifest; the first row names the columns (coeffs,source,...)")
    header = [name.strip() for name in header]
    unknown = [name for name in header if name not in ROW_FIELDS]
    if unknown:
        raise ManifestError(f"{path}: unknown column(s) {', '.join(unknown)}; columns are {', '.join(ROW_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS[:1] if name not in header]  # source may come from --source
    if missing:
        raise ManifestError(f"{path}: no {' or '.join(missing)} column; every row needs coeffs and source")
    rows = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue  # blank lines
        number = len(rows) + 1
        if len(cells) != len(header):
            rows.append(ManifestRow(number, {}, f"{len(cells)} cells for {len(header)} columns; quote cells "
                                                "holding commas (\"0,20,-10\")"))
            continue
        rows.append(ManifestRow(number, {k: v.strip() for k, v in zip(header, cells) if v.strip() != ""}))
    return rows


def _jsonl_rows(path: Path, text: str) -> List[ManifestRow]:
    """Rows of a JSONL manifest. An unknown key fails the whole manifest, as an unknown CSV column does:
    it is a mistake in how the manifest was written (a typo like `ouptut` or `expresion_scale`, usually
    on every line a script wrote), found before anything renders rather than once per row."""
    rows = []
    unknown_keys: Dict[str, List[int]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        number = len(rows) + 1
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(ManifestRow(number, {}, f"not a JSON object ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(values, dict):
            rows.append(ManifestRow(number, {}, "not a JSON object; write {\"coeffs\": ..., \"source\": ...}"))
            continue
        for name in values:
            if name not in ROW_FIELDS:
                unknown_keys.setdefault(name, []).append(number)
        rows.append(ManifestRow(number, {k: v for k, v in values.items() if v is not None}))
    if unknown_keys:
        where = "; ".join(f"{name} (row {', '.join(map(str, numbers[:5]))}{', ...' if len(numbers) > 5 else ''})"
                          for name, numbers in unknown_keys.items())
        raise ManifestError(f"{path}: unknown key(s) {where}; keys are {', '.join(ROW_FIELDS)}")
    return rows


def _check_cells(values: Dict) -> Optional[str]:
    missing = [name for name in REQUIRED_FIELDS if not values.get(name)]
    if missing:
        return f"no {' or '.join(missing)}; every row needs coeffs and source"
    for name in PATH_FIELDS:
        if name in values and not isinstance(values[name], str):
            return f"{name}: {values[name]!r} is not a path"
    return None


def rows_from_globs(patterns: Sequence[str], source: Optional[str]) -> List[ManifestRow]:
    """Rows for `--coeffs 'results/*.mat' --source face.png`: every file a pattern matches, sorted, once.
    A pattern matching nothing raises ManifestError naming it (a usage error: nothing to render is a
    mistake, not a success); a plain path is taken as given, so a missing file fails its row with
    `sfr render`'s message."""
    paths: List[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise ManifestError(f"--coeffs '{pattern}' matches no file; check the pattern and the folder "
                                f"(relative patterns start from {os.getcwd()})")
        paths.extend(p for p in matched if p not in paths)
    rows = [ManifestRow(number, {"coeffs": path, "source": source}) for number, path in enumerate(paths, 1)]
    for row in rows:
        row.error = _check_cells({k: v for k, v in row.values.items() if v is not None})
    return rows


def parse_shard(text: str) -> Tuple[int, int]:
    """`"2/4"` -> (2, 4); raises ValueError."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not K/N like 1/4") from None
    if not 1 <= k <= n:
        raise ValueError(f"shard {text}: K must be 1..N")
    return k, n


def select_shard(rows: Sequence[ManifestRow], shard: Optional[Tuple[int, int]]) -> List[ManifestRow]:
    """Rows K, K+N, K+2N, ... (by row number): N shards together cover every row exactly once, whatever
    each row holds, and a shard's rows do not change when other rows are fixed."""
    if shard is None:
        return list(rows)
    k, n = shard
    return [row for row in rows if (row.number - 1) % n == k - 1]
