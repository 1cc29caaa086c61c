"""Raw inputs of the preprocessor: glob expansion and the documents of one file, with errors that point at the line.

`.jsonl` / `.json` files hold one JSON object per line with the text in a field (a `.json` file may instead hold
one JSON array of objects); any other file is text: the whole file is one document (`file` mode, for source code
and books) or each non-empty line is one (`line` mode). A trailing `.gz` is read through gzip.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence

from mamba_jax.data.errors import DataError

TEXT_MODES = ("file", "line")


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """Sorted, de-duplicated files matched by the glob patterns (`**` recurses); each pattern must match a file."""
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    if not patterns:
        raise DataError("no inputs given: pass at least one --input GLOB (e.g. --input 'data/*.jsonl').")
    files: set[str] = set()
    for pattern in patterns:
        pattern = os.path.expanduser(os.fspath(pattern))
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched:
            raise DataError(
                f"no input files matched {pattern!r}; check the path (quote the glob so the shell leaves it to us)."
            )
        files.update(os.path.abspath(f) for f in matched)
    return sorted(files)


def is_json_lines(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(
    path: str, *, field: str = "text", text_mode: str = "file", skip_empty: bool = False
) -> Iterator[str]:
    """The non-empty documents of one input file, in file order; a file without any is an error unless skipped."""
    if text_mode not in TEXT_MODES:
        raise DataError(f"text mode must be one of {TEXT_MODES}, got {text_mode!r}.")
    if os.path.getsize(path) == 0:
        if skip_empty:
            return
        raise DataError(f"input file {path} is empty; remove it from the inputs or pass --skip-empty.")
    reader = _json_documents(path, field) if is_json_lines(path) else _text_documents(path, text_mode)
    count = 0
    try:
        for doc in reader:
            if doc.strip():
                count += 1
                yield doc
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it or leave it out.") from e
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}.") from e
    if count == 0 and not skip_empty:
        raise DataError(
            f"input file {path} has no text (only blank lines or empty documents); remove it from the inputs or "
            f"pass --skip-empty."
        )


def _text_documents(path: str, text_mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        if text_mode == "file":
            yield f.read()
        else:
            for line in f:
                yield line.rstrip("\r\n")


def _json_documents(path: str, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == "[":  # a .json file holding one array of objects
            f.seek(0)
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}).") from e
            for i, row in enumerate(rows):
                yield _field(row, field, f"{path}: element {i}")
            return
        f.seek(0)
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); each line of a JSON-lines file "
                    f"must be one complete JSON object."
                ) from e
            yield _field(row, field, f"{path}:{lineno}")


def _field(row, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(row).__name__}.")
    if field not in row:
        keys = ", ".join(repr(k) for k in list(row)[:10])
        raise DataError(f"{where}: no field {field!r} (the object has {keys}); pass the text field with --field NAME.")
    text = row[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, not text.")
    return text
