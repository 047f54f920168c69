"""The Kaggle ``fer2013.csv`` reader, also used for torchvision's CSV files.

This module owns reading one FER CSV file into a validated ``Part``: line bookkeeping (1-based physical line
numbers under ``\\n``, ``\\r\\n`` and lone ``\\r``), non-UTF-8 detection, the header check, pyarrow's CSV reader
(malformed records reported by line), the vectorised pixel parser (numpy over the pixel bytes) and the label /
Usage checks. Every check runs vectorised; only the first few bad rows are described in Python. ``parse_csv``
runs those steps in order; ``CsvSource`` is the ``csv`` format.
"""

from __future__ import annotations

import codecs
import contextvars
import csv as pycsv
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError
from fer_ray.data.ingest.common import (
    DUP_HEADER,
    LABEL_BAD,
    MAX_PROBLEMS,
    N_PIXELS,
    NON_UTF8,
    OK,
    PIXEL_COUNT,
    PIXEL_NOT_INT,
    PIXEL_RANGE,
    SKIP_HINT,
    USAGE_BAD,
    Part,
    describe_row,
    hash_file,
    reading,
)

log = logging.getLogger(__name__)

HEADER = "emotion,pixels,Usage"
_CHUNK_ROWS = 1024  # CSV rows parsed per numpy block (~8 MB of pixel text)
_READ_BLOCK = 1 << 22  # pyarrow CSV block size (~500 FER rows)
_SCAN_CHUNK = 1 << 24


class CsvSource:
    """A Kaggle ``fer2013.csv`` file."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            if path.is_dir():
                raise DataError(f"{path}: is a directory, not a CSV file; pass the fer2013.csv path or fmt='auto'")
            raise DataError(f"{path}: file not found; check the path to fer2013.csv")
        self.path = path

    def fingerprint(self, h: hashlib._Hash) -> None:
        hash_file(h, self.path)

    def load(self, on_bad_row: str) -> Part:
        return parse_csv(self.path, on_bad_row=on_bad_row, default_usage=0, id_prefix="")


# --------------------------------------------------------------------------------------------- the steps


def parse_csv(path: Path, *, on_bad_row: str, default_usage: int, id_prefix: str,
              allow_unlabeled: bool = False) -> Part | None:
    """Read and validate one FER CSV file.

    Args:
        path: The CSV file.
        on_bad_row: ``"error"`` or ``"skip"``.
        default_usage: Usage code for every row when the file has no ``Usage`` column.
        id_prefix: Prepended to ``row:<line>`` ids.
        allow_unlabeled: Return ``None`` (instead of raising) when there is no ``emotion`` column.

    Returns:
        The rows, or ``None`` for an allowed unlabelled file.

    Raises:
        DataError: Unreadable file, bad header, or (in ``"error"`` mode) the first bad row, by line.
    """
    skip = on_bad_row == "skip"
    lines = _read_lines(path, skip)
    header = _read_header(path, lines, allow_unlabeled)
    if header is None:
        return None
    rows = _read_rows(path, lines, header)
    codes, images, labels, usage = _check_rows(rows, default_usage, lines.bad_utf8_lines)
    bad_rows = np.flatnonzero(codes != OK)
    ordered = _problems(rows, codes, bad_rows, lines.bad_utf8_lines)
    if ordered and not skip:
        raise DataError(f"{ordered[0]}, {SKIP_HINT}")
    skipped = len(bad_rows) + len(rows.invalid)
    problems = ordered[:MAX_PROBLEMS]
    keep = codes == OK
    if not keep.any():
        raise DataError(f"{path}: no valid rows (all {skipped} rows are bad; first: {problems[0]})")
    ids = np.array([f"{id_prefix}row:{line}" for line in rows.row_lines[keep].tolist()], dtype=object)
    return Part(images[keep], labels[keep], usage[keep].astype(np.int8), ids, skipped, problems)


@dataclass
class _Lines:
    """A CSV file's bytes (invalid UTF-8 replaced by U+FFFD) and where its physical lines are."""

    raw: bytes
    starts: np.ndarray  # byte offset of each line's content
    ends: np.ndarray  # byte offset of each line's terminator
    record_lines: np.ndarray  # 1-based physical line numbers of the non-empty lines
    bad_utf8_lines: np.ndarray  # the line of each invalid UTF-8 sequence (empty unless skip mode)


def _read_lines(path: Path, skip: bool) -> _Lines:
    """Step 1: the file's bytes without a BOM and its line spans; non-UTF-8 bytes raise unless ``skip``."""
    with reading(path, is_dir="is a directory, expected a CSV file"):
        raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw or raw.isspace():
        raise DataError(f"{path}: line 1: empty file; expected a header '{HEADER}' and one row per image")
    starts, ends = _line_spans(raw)
    fixed, bad_utf8 = _utf8_repair(raw)
    bad_utf8_lines = np.searchsorted(starts, np.asarray(bad_utf8, np.int64), side="right")
    if len(bad_utf8_lines) and not skip:
        pos, line = bad_utf8[0], int(bad_utf8_lines[0])
        raise DataError(f"{path}: line {line}: non-UTF-8 byte 0x{raw[pos]:02x} at column "
                        f"{pos - int(starts[line - 1]) + 1}; re-save the file as UTF-8, {SKIP_HINT}")
    if len(bad_utf8):
        raw = fixed
        starts, ends = _line_spans(raw)
    return _Lines(raw, starts, ends, np.flatnonzero(ends > starts) + 1, bad_utf8_lines)


@dataclass
class _Header:
    """The header line: column names as written, trimmed + lower-cased, and its line number."""

    names: list[str]
    norm: list[str]
    line: int


def _read_header(path: Path, lines: _Lines, allow_unlabeled: bool) -> _Header | None:
    """Step 2: the header, checked; ``None`` for an allowed file without an ``emotion`` column."""
    line = int(lines.record_lines[0])
    text = lines.raw[lines.starts[line - 1]:lines.ends[line - 1]].decode("utf-8", errors="replace")
    names = next(pycsv.reader([text]))
    norm = [n.strip().lower() for n in names]
    shown = ",".join(names)[:60]
    if len(set(norm)) != len(norm):
        raise DataError(f"{path}: line {line}: duplicate column names in header {shown!r}; expected '{HEADER}'")
    if "pixels" not in norm or ("emotion" not in norm and not allow_unlabeled):
        if norm and re.fullmatch(r"[0-9]+", norm[0]):
            raise DataError(f"{path}: line {line}: missing header, the first line is data ({shown!r}...); "
                            f"add the header line '{HEADER}'")
        missing = [c for c in ("emotion", "pixels") if c not in norm]
        raise DataError(f"{path}: line {line}: header {shown!r} lacks column(s) {', '.join(missing)}; "
                        f"expected '{HEADER}'")
    return _Header(names, norm, line) if "emotion" in norm else None


@dataclass
class _Rows:
    """The records pyarrow read, the malformed ones it skipped, and the physical line of each."""

    path: Path
    header: _Header
    table: pa.Table
    invalid: list[tuple[int | None, int, int]]  # (record number, expected fields, actual fields)
    row_lines: np.ndarray  # line of each table row
    bad_field_lines: np.ndarray  # line of each ``invalid`` record

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(self.header.norm.index(name))

    def field(self, i: int, name: str) -> str:
        """Row ``i``'s value of column ``name`` (``""`` when the file has no such column)."""
        return self.column(name)[i].as_py() if name in self.header.norm else ""


def _read_rows(path: Path, lines: _Lines, header: _Header) -> _Rows:
    """Step 3: every record as strings (pyarrow), malformed records set aside, rows mapped to their lines."""
    table, invalid = _read_table(path, lines.raw, header.names)
    bad_numbers = np.array([r[0] for r in invalid], np.int64)
    record_lines = lines.record_lines
    bad_field_lines = record_lines[bad_numbers - 1] if len(bad_numbers) else np.empty(0, np.int64)
    row_lines = np.delete(record_lines[1:], bad_numbers - 2) if len(bad_numbers) else record_lines[1:]
    if len(row_lines) != table.num_rows:  # defensive: unusual line endings; fall back to record order
        log.warning("%s: could not map rows to line numbers; ids use record numbers", path)
        row_lines = np.arange(2, table.num_rows + 2)
    if table.num_rows == 0 and not invalid:
        raise DataError(f"{path}: line {header.line}: header only, no data rows; the file is empty or truncated")
    return _Rows(path, header, table, invalid, row_lines, bad_field_lines)


def _read_table(path: Path, raw: bytes, names: list[str]) -> tuple[pa.Table, list[tuple[int | None, int, int]]]:
    """pyarrow's CSV read of ``raw`` (all columns as strings) and the records it skipped as malformed."""
    invalid: list[tuple[int | None, int, int]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.expected_columns, row.actual_columns))
        return "skip"

    def read(threads: bool) -> pa.Table:
        invalid.clear()
        return pacsv.read_csv(
            pa.BufferReader(raw),
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=_READ_BLOCK),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, check_utf8=False,
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))

    try:
        table = read(True)
        if invalid:  # row numbers are only reported by the single-threaded reader
            table = read(False)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: unreadable CSV ({' '.join(str(e).split())[:160]}); "
                        f"expected '{HEADER}' rows") from None
    return table, invalid


def _check_rows(rows: _Rows, default_usage: int,
                bad_utf8_lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 4: per-row problem code (the highest of its problems), images, labels and usage codes.

    Returns:
        ``(codes, images, labels, usage)``: int8 ``[n]`` codes (``OK`` for a good row), uint8 ``[n, 48, 48]``
        images (undefined where the code is not ``OK``), int64 labels and int64 usage codes.
    """
    codes, images = _parse_pixels(rows.column("pixels"))
    lab = pc.utf8_trim_whitespace(rows.column("emotion").combine_chunks())
    is_int = pc.match_substring_regex(lab, r"^[0-9]{1,6}$")
    labels = pc.cast(pc.if_else(is_int, lab, pa.scalar("-1")), pa.int64()).to_numpy(zero_copy_only=False)
    codes = np.maximum(codes, np.where((labels < 0) | (labels >= len(CLASSES)), LABEL_BAD, OK).astype(np.int8))
    codes[pc.equal(pc.utf8_lower(lab), "emotion").to_numpy(zero_copy_only=False)] = DUP_HEADER
    if "usage" in rows.header.norm:
        us = pc.utf8_lower(pc.utf8_trim_whitespace(rows.column("usage").combine_chunks()))
        idx = pc.index_in(us, value_set=pa.array([u.lower() for u in USAGES]))
        usage = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        codes = np.maximum(codes, np.where(usage < 0, USAGE_BAD, OK).astype(np.int8))
    else:
        usage = np.full(rows.table.num_rows, default_usage, np.int64)
    if len(bad_utf8_lines):
        codes[np.isin(rows.row_lines, bad_utf8_lines)] = NON_UTF8
    return codes, images, labels, usage


def _parse_pixels(pixels: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Problem code and image of every row of the ``pixels`` column, ``_CHUNK_ROWS`` rows per numpy block."""
    n = len(pixels)
    codes = np.zeros(n, np.int8)
    images = np.empty((n, IMG_SIZE, IMG_SIZE), np.uint8)
    for a in range(0, n, _CHUNK_ROWS):
        sub = pixels.slice(a, _CHUNK_ROWS)
        c, imgs = _parse_pixel_block(*_string_buffers(sub.chunk(0) if sub.num_chunks == 1 else sub.combine_chunks()))
        block = slice(a, a + len(sub))
        codes[block] = c
        if len(imgs) == len(sub):
            images[block] = imgs
        else:
            images[block][c == OK] = imgs
    return codes, images


def _problems(rows: _Rows, codes: np.ndarray, bad_rows: np.ndarray, bad_utf8_lines: np.ndarray) -> list[str]:
    """Step 5: one-line ``FILE: line N: problem; fix`` for the first ``MAX_PROBLEMS`` bad rows and the first
    ``MAX_PROBLEMS`` malformed records, in line order."""
    path = rows.path
    found = []
    for i in bad_rows[:MAX_PROBLEMS].tolist():
        line = int(rows.row_lines[i])
        problem = describe_row(int(codes[i]), rows.field(i, "emotion"), rows.field(i, "pixels"), rows.field(i, "usage"))
        found.append((line, f"{path}: line {line}: {problem}"))
    utf8_lines = set(bad_utf8_lines.tolist())
    for (_, expected, actual), line in zip(rows.invalid[:MAX_PROBLEMS], rows.bad_field_lines.tolist()):
        if line in utf8_lines:
            found.append((line, f"{path}: line {line}: {describe_row(NON_UTF8, '', '', '')}"))
        else:
            found.append((line, f"{path}: line {line}: expected {expected} comma-separated fields "
                                f"({','.join(rows.header.names)}), got {actual}; the line is truncated or malformed, "
                                "complete or delete it"))
    return [message for _, message in sorted(found, key=lambda t: t[0])]


# --------------------------------------------------------------------------------------------- bytes and lines

_utf8_errors: contextvars.ContextVar[list[int]] = contextvars.ContextVar("_utf8_errors")


def _record_utf8_error(exc: UnicodeError) -> tuple[str, int]:
    _utf8_errors.get().append(exc.start)  # type: ignore[attr-defined]
    return "\ufffd", exc.end  # type: ignore[attr-defined]


codecs.register_error("fer_ray.ingest.record", _record_utf8_error)


def _utf8_repair(raw: bytes) -> tuple[bytes, list[int]]:
    """Byte offsets of invalid UTF-8 sequences, and ``raw`` with each replaced by U+FFFD (lines unchanged)."""
    if raw.isascii():
        return raw, []
    found: list[int] = []
    token = _utf8_errors.set(found)
    try:
        text = raw.decode("utf-8", errors="fer_ray.ingest.record")
    finally:
        _utf8_errors.reset(token)
    return (text.encode("utf-8") if found else raw), found


def _byte_positions(buf: np.ndarray, value: int) -> np.ndarray:
    parts = [np.flatnonzero(buf[i:i + _SCAN_CHUNK] == value) + i for i in range(0, len(buf), _SCAN_CHUNK)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _line_spans(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of each physical line's content (terminators ``\\n``, ``\\r\\n``, lone ``\\r``)."""
    buf = np.frombuffer(raw, np.uint8)
    lf = _byte_positions(buf, 10)
    term_start, term_end = lf, lf + 1
    if b"\r" in raw:
        cr = _byte_positions(buf, 13)
        follows = np.zeros(len(cr), bool)
        inside = cr + 1 < len(buf)
        follows[inside] = buf[cr[inside] + 1] == 10
        crlf = np.zeros(len(lf), bool)
        crlf[lf > 0] = buf[lf[lf > 0] - 1] == 13
        lone = cr[~follows]
        term_start = np.concatenate([lf - crlf, lone])
        term_end = np.concatenate([lf + 1, lone + 1])
        order = np.argsort(term_start, kind="stable")
        term_start, term_end = term_start[order], term_end[order]
    starts = np.concatenate([[0], term_end]).astype(np.int64)
    ends = np.concatenate([term_start, [len(buf)]]).astype(np.int64)
    if starts[-1] == len(buf):  # the file ends with a terminator: no line after it
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


# --------------------------------------------------------------------------------------------- pixel parser


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (bytes, offsets) of a pyarrow string array; offsets are int64, rebased to start at 0."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    _, offsets, data = arr.buffers()
    odt = np.dtype(np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    offs = np.frombuffer(offsets, odt, count=len(arr) + 1, offset=arr.offset * odt.itemsize).astype(np.int64)
    if data is None or offs[-1] == offs[0]:
        return np.empty(0, np.uint8), offs - offs[0]
    return np.frombuffer(data, np.uint8)[offs[0]:offs[-1]], offs - offs[0]


def _parse_pixel_block(chars: np.ndarray, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised parse and validation of R concatenated pixel strings.

    Args:
        chars: uint8 bytes of the R strings back to back.
        offs: int64 ``[R+1]`` offsets of each string in ``chars`` (``offs[0] == 0``, ``offs[-1] == len(chars)``).

    Returns:
        ``(codes, images)``: int8 ``[R]`` problem codes (``OK``, ``PIXEL_COUNT``, ``PIXEL_RANGE`` or
        ``PIXEL_NOT_INT``) and uint8 ``[K, 48, 48]`` images of the K rows whose code is ``OK``, in order.
    """
    codes = np.zeros(len(offs) - 1, np.int8)
    isdig = (chars - np.uint8(48)) < 10
    if not (isdig | (chars == 32)).all():
        junk = ~(isdig | (chars == 32) | (chars == 9))
        if junk.any():
            codes[np.searchsorted(offs, np.flatnonzero(junk), side="right") - 1] = PIXEL_NOT_INT
    starts, lens = _digit_runs(isdig, offs)
    counts = np.diff(np.searchsorted(starts, offs))
    vals = _token_values(chars, starts, lens)
    too_big = vals > 255
    if too_big.any():
        rows = np.searchsorted(offs, starts[too_big], side="right") - 1
        codes[rows] = np.maximum(codes[rows], PIXEL_RANGE)
    codes = np.maximum(codes, np.where(counts != N_PIXELS, PIXEL_COUNT, OK).astype(np.int8))
    ok = codes == OK
    if not ok.all():
        vals = vals[np.repeat(ok, counts)]
    return codes, vals.astype(np.uint8).reshape(-1, IMG_SIZE, IMG_SIZE)


def _digit_runs(isdig: np.ndarray, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every token: a maximal run of digits; a row boundary always ends one and starts
    another."""
    n = len(isdig)
    step = np.diff(isdig.view(np.int8))  # +1: a token starts at i+1, -1: a token ends at i
    begin = np.empty(n, bool)
    end = np.empty(n, bool)
    if n:
        begin[0], end[-1] = isdig[0], isdig[-1]
        np.equal(step, 1, out=begin[1:])
        np.equal(step, -1, out=end[:-1])
    inner = offs[1:-1]
    inner = inner[(inner > 0) & (inner < n)]
    begin[inner] = isdig[inner]
    end[inner - 1] = isdig[inner - 1]
    starts = np.flatnonzero(begin)
    return starts, np.flatnonzero(end) + 1 - starts


def _token_values(chars: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """int16 value of each token; tokens over 3 digits are read exactly (capped at 999)."""
    n = len(chars)
    digit = np.empty(n + 2, np.int16)  # padded so that starts + 2 never runs off the end
    np.subtract(chars, 48, out=digit[:n], dtype=np.int16)
    digit[n:] = 0
    vals = digit[starts]
    vals = np.where(lens > 1, vals * 10 + digit[starts + 1], vals)
    vals = np.where(lens > 2, vals * 10 + digit[starts + 2], vals)
    long = np.flatnonzero(lens > 3)
    if len(long):  # leading zeros ("0255") or out-of-range numbers: exact value via Python ints, rare
        vals[long] = [min(int(chars[s:s + k].tobytes()), 999) for s, k in zip(starts[long].tolist(),
                                                                               lens[long].tolist())]
    return vals
