"""Where documents come from: the stdlib corpus, or directories of .txt / .jsonl / .parquet files.

A source is listed into *units*, the pieces one task reads: a text file, a byte range of a .jsonl
file, or a row group of a .parquet file. Units are sorted by (source, relative path, position), so
the document order is a pure function of the files, never of the number of workers.

- ``default`` (or ``None``): every ``.py`` file under ``sysconfig.get_paths()['stdlib']`` except
  ``site-packages`` / ``dist-packages`` (installed third-party code). The stdlib's own test suite is
  kept: it is real Python (about 19 of the 31 MB on CPython 3.11) and some of its files carry
  invalid UTF-8 on purpose, which exercises the replacement path.
- a directory: ``.txt``, ``.md`` and ``.py`` files are one document each, ``.jsonl`` one document per
  non-blank line (the string in ``text_field``), ``.parquet`` one document per row (column
  ``text_field``). Hidden files and directories (a name starting with ``.``) and other suffixes are
  skipped (the count is reported).
- a single file of one of those kinds.

Bytes that are not valid UTF-8 are replaced by U+FFFD (one per invalid sequence, as Python's
``errors="replace"`` does) and counted. The train/validation split is by a keyed hash of the
document's text (``is_validation``), so identical documents always land in the same split.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
JSONL_UNIT_BYTES = 32 << 20        # a .jsonl file is read in byte ranges of this size (one task each)

SourceSpec = Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class SourceError(ValueError):
    """A source that cannot be read as documents (empty, malformed record, missing field)."""


# --------------------------------------------------------------------------------------- UTF-8
_invalid = {"bytes": 0, "sequences": 0}


def _count_replace(exc: UnicodeDecodeError):
    _invalid["bytes"] += exc.end - exc.start
    _invalid["sequences"] += 1
    return "\ufffd", exc.end


codecs.register_error("data_pipeline.count_replace", _count_replace)


def decode_utf8(data: bytes) -> Tuple[str, int]:
    """``(text, invalid_bytes)``: invalid sequences become U+FFFD and their bytes are counted."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        before = _invalid["bytes"]
        text = data.decode("utf-8", errors="data_pipeline.count_replace")
        return text, _invalid["bytes"] - before


def encode_utf8(text: str) -> Tuple[bytes, str, int]:
    """``(bytes, text, invalid)`` for a str that may hold lone surrogates (from JSON escapes)."""
    try:
        return text.encode("utf-8"), text, 0
    except UnicodeEncodeError:
        fixed, bad = decode_utf8(text.encode("utf-8", errors="surrogatepass"))
        return fixed.encode("utf-8"), fixed, bad


# --------------------------------------------------------------------------------------- split
def split_key(seed: int) -> bytes:
    return b"nl-pretrain-split" + int(seed).to_bytes(8, "little", signed=True)


def is_validation(text_bytes: bytes, val_fraction: float, seed: int = 0) -> bool:
    """A document is held out when its keyed content hash, read as a number in [0, 1), is below
    ``val_fraction``: identical texts always share a split, and the split never depends on order."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(text_bytes, digest_size=8, key=split_key(seed)).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < val_fraction


# --------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One piece of work: ``kind`` in {text, jsonl, parquet}; ``part`` is the byte range of a .jsonl
    file or the row group of a .parquet file; ``limit`` caps the documents taken (0 = all)."""
    path: str
    rel: str
    kind: str
    source_index: int
    part: Tuple[int, int] = (0, 0)
    size: int = 0
    limit: int = 0

    @property
    def name(self) -> str:
        if self.kind == "jsonl":
            return f"{self.path} (bytes {self.part[0]}-{self.part[1]})"
        if self.kind == "parquet":
            return f"{self.path} (row group {self.part[0]})"
        return self.path


@dataclass
class SourceListing:
    units: List[Unit]
    sources: List[dict] = field(default_factory=list)   # one record per --source, for the manifest

    @property
    def total_bytes(self) -> int:
        return sum(u.size for u in self.units)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _kind(path: Path) -> Optional[str]:
    s = path.suffix.lower()
    if s in TEXT_SUFFIXES:
        return "text"
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in PARQUET_SUFFIXES:
        return "parquet"
    return None


def _walk(root: Path) -> Tuple[List[Path], int]:
    """Files under root in sorted relative-path order, skipping hidden entries; (files, ignored)."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            if _kind(p) is None:
                ignored += 1
            else:
                files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files, ignored


def _stdlib_files() -> List[Path]:
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _file_units(path: Path, rel: str, index: int, text_field: str) -> List[Unit]:
    kind = _kind(path)
    size = path.stat().st_size
    if kind == "text":
        return [Unit(str(path), rel, "text", index, (0, size), size)]
    if kind == "jsonl":
        step = JSONL_UNIT_BYTES
        return [Unit(str(path), rel, "jsonl", index, (a, min(a + step, size)), min(step, size - a))
                for a in range(0, size, step)]
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(str(path)).metadata
    except Exception as exc:
        raise SourceError(f"cannot read parquet file '{path}': {exc}; check that it is a complete .parquet "
                          f"file") from exc
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if text_field not in names:
        raise SourceError(f"parquet file '{path}' has no column '{text_field}' (columns: {', '.join(names)}); "
                          f"pass --text-field with the column that holds the text")
    units = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        units.append(Unit(str(path), rel, "parquet", index, (g, rg.num_rows), rg.total_byte_size))
    return units


def list_units(source: SourceSpec = None, text_field: str = "text", max_documents: int = 0) -> SourceListing:
    """All units of the source(s) in document order. ``max_documents`` keeps the first N documents
    (empty ones included); 0 keeps everything."""
    specs = _as_list(source)
    units: List[Unit] = []
    records = []
    for i, spec in enumerate(specs):
        if spec in (None, "", "default", "stdlib"):
            root = stdlib_root()
            files, ignored, kind = _stdlib_files(), 0, "stdlib"
        else:
            root = Path(spec).expanduser()
            if not root.exists():
                raise FileNotFoundError(
                    f"source path '{spec}' does not exist; pass --source default for the stdlib corpus "
                    f"or a directory of .txt/.jsonl/.parquet files")
            if root.is_file():
                if _kind(root) is None:
                    raise SourceError(f"source file '{spec}' has suffix '{root.suffix}'; supported: "
                                      f"{', '.join(SUPPORTED)}")
                files, ignored, kind, root = [root], 0, "file", root.parent
            else:
                files, ignored = _walk(root)
                kind = "directory"
        src_units = []
        for f in files:
            src_units.extend(_file_units(f, f.relative_to(root).as_posix(), i, text_field))
        if not src_units:
            raise SourceError(f"source '{spec}' holds no {', '.join(SUPPORTED)} files ({ignored} other files "
                              f"skipped); point --source at a directory with such files")
        records.append({"spec": "default" if kind == "stdlib" else str(spec), "kind": kind,
                        "root": str(root.resolve()), "files": len(files), "ignored_files": ignored,
                        "bytes": sum(u.size for u in src_units)})
        units.extend(src_units)
    if max_documents:
        units = _limit_documents(units, max_documents, text_field)
    return SourceListing(units, records)


def _as_list(source: SourceSpec) -> list:
    if source is None or isinstance(source, (str, os.PathLike)):
        return [source]
    specs = list(source)
    return specs or [None]


def _limit_documents(units: List[Unit], max_documents: int, text_field: str) -> List[Unit]:
    out, left = [], max_documents
    for u in units:
        n = sum(1 for _ in read_unit(u, text_field))  # a scan, only for the units kept
        if n >= left:
            out.append(Unit(u.path, u.rel, u.kind, u.source_index, u.part, u.size, left))
            break
        out.append(u)
        left -= n
    return out


# --------------------------------------------------------------------------------------- reading
@dataclass
class Document:
    text: str
    data: bytes          # UTF-8 bytes of ``text`` (after replacement)
    invalid_bytes: int   # bytes of the raw input that were not valid UTF-8
    raw_bytes: int


def read_unit(unit: Unit, text_field: str = "text") -> Iterator[Document]:
    """The documents of one unit, in order (at most ``unit.limit`` when set)."""
    it = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}[unit.kind](unit, text_field)
    if unit.limit:
        for i, doc in enumerate(it):
            if i >= unit.limit:
                break
            yield doc
    else:
        yield from it


def _read_text(unit: Unit, text_field: str) -> Iterator[Document]:
    try:
        raw = Path(unit.path).read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read '{unit.path}': {exc}") from exc
    text, bad = decode_utf8(raw)
    yield Document(text, raw if not bad else text.encode("utf-8"), bad, len(raw))


def _read_jsonl(unit: Unit, text_field: str) -> Iterator[Document]:
    start, end = unit.part
    with open(unit.path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()          # a line belongs to the range holding its first byte
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            text, bad = decode_utf8(line)
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{unit.path}: the line at byte {line_start} is not valid JSON ({exc.msg}); "
                                  f"fix or remove that line") from exc
            if not isinstance(rec, dict) or text_field not in rec:
                keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                raise SourceError(f"{unit.path}: the record at byte {line_start} has no field '{text_field}' "
                                  f"(it has: {keys}); pass --text-field with the field that holds the text")
            value = rec[text_field]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise SourceError(f"{unit.path}: field '{text_field}' of the record at byte {line_start} is a "
                                  f"{type(value).__name__}, not a string")
            data, value, bad2 = encode_utf8(value)
            yield Document(value, data, bad + bad2, len(line))


def _read_parquet(unit: Unit, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.ParquetFile(unit.path).read_row_group(unit.part[0], columns=[text_field])
    col = table.column(0)
    binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
    if not (binary or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise SourceError(f"parquet column '{text_field}' of '{unit.path}' has type {col.type}, not string; "
                          f"pass --text-field with a string column")
    for value in col.to_pylist():
        if value is None:
            value = b"" if binary else ""
        if binary:
            text, bad = decode_utf8(value)
            yield Document(text, text.encode("utf-8"), bad, len(value))
        else:
            data, text, bad = encode_utf8(value)
            yield Document(text, data, bad, len(data))
