"""The run log: a compact, append-only record of a watch that :func:`gradwatch.load` turns back into a Report.

``attach(model, log_dir=...)`` (and ``KerasCallback(log_dir=...)``) adds a
:class:`~gradwatch.reporters.runlog.RunLogWriter`, which writes this format; this module reads it. Every flush it
appends the flushed per-parameter statistics and the detector's verdicts, so a crash loses at most the last
flush; at detach it appends the final report.

Format. A directory of segment files ``segment-000001.gwlog``, ``segment-000002.gwlog``, ... Each holds framed
records: a 13-byte frame head (``b"GWL1"``, a record kind byte, the payload length and its CRC-32, little-endian)
then the payload (JSON, or ``numpy.savez`` bytes read back with ``allow_pickle=False``). A reader stops at the
first frame that is cut short or fails its CRC, keeping everything before it.

Bounded size. When a segment grows past half of ``max_bytes``, the writer starts the next segment with the
run's header, a snapshot of the watcher's bounded history (older steps already merged pairwise) and the latest
verdicts, syncs it to disk, and only then deletes the older segments. On disk there is at most one full segment
and one growing segment, however long training runs.

A new watch writing to a directory replaces the gradwatch log there (only ``*.gwlog`` files are touched).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.core.report import Report
from gradwatch.core.stats import History, ParamTable, StepBatch
from gradwatch.core.structure import Structure
from gradwatch.core.summarize import Verdicts, build_report
from gradwatch.errors import LogError

__all__ = ["CLOSE", "FORMAT_VERSION", "HEADER", "SNAPSHOT", "STATS", "VERDICTS", "batch_arrays", "frame",
           "load_report", "pack_arrays", "read_log", "segment_path", "segments"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"GWL1"
_HEAD = struct.Struct("<4sBII")
HEADER, SNAPSHOT, STATS, VERDICTS, CLOSE = 1, 2, 3, 4, 5
_KIND_NAMES = {HEADER: "header", SNAPSHOT: "snapshot", STATS: "stats", VERDICTS: "verdicts", CLOSE: "close"}
_SUFFIX = ".gwlog"


def segments(directory: Path) -> list[Path]:
    """The segment files of the log in ``directory``, oldest first."""
    return sorted(directory.glob(f"segment-*{_SUFFIX}"))


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def frame(kind: int, payload: bytes) -> bytes:
    """One record as written to a segment: the frame head, then the payload."""
    return _HEAD.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def segment_path(directory: Path, index: int) -> Path:
    return directory / f"segment-{index:06d}{_SUFFIX}"


def batch_arrays(batch: StepBatch) -> dict[str, np.ndarray]:
    """A flush's statistics as the arrays a STATS record holds."""
    out = {"steps": batch.steps, "values": batch.values.astype(np.float32), "skipped": batch.skipped}
    out.update({f"extra_{k}": v for k, v in batch.extras.items()})
    return out


# -- reading ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    kind: int
    payload: bytes


def _read_records(path: Path) -> tuple[list[_Record], str | None]:
    """Every intact record of a segment, and why reading stopped early (``None`` at a clean end)."""
    data = path.read_bytes()
    out: list[_Record] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            return out, f"{len(data) - pos} trailing byte(s) cut short at offset {pos}"
        magic, kind, length, crc = _HEAD.unpack_from(data, pos)
        if magic != _MAGIC or kind not in _KIND_NAMES:
            return out, f"unrecognised bytes at offset {pos}"
        payload = data[pos + _HEAD.size:pos + _HEAD.size + length]
        if len(payload) < length:
            return out, f"a {_KIND_NAMES[kind]} record cut short at offset {pos}"
        if zlib.crc32(payload) != crc:
            return out, f"a {_KIND_NAMES[kind]} record at offset {pos} fails its checksum"
        out.append(_Record(kind, payload))
        pos += _HEAD.size + length
    return out, None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLog:
    """What a run log holds once read: the header, the rebuilt history, the latest verdicts, the final report."""

    header: dict[str, Any]
    history: History
    verdicts: Verdicts | None
    step: int
    monitoring: str
    final: dict[str, Any] | None
    damage: str | None
    segment: Path


def read_log(log_dir: str | os.PathLike) -> RunLog:
    """Read a run log directory.

    Raises:
        LogError: The directory is missing, holds no gradwatch log, or no segment has an intact header.
    """
    directory = Path(log_dir)
    if not directory.is_dir():
        raise LogError(f"no gradwatch run log at {str(directory)!r}: the directory does not exist. Write one with "
                       "gradwatch.attach(model, log_dir=...) or KerasCallback(log_dir=...).")
    found = segments(directory)
    if not found:
        raise LogError(f"{str(directory)!r} holds no gradwatch run log (no segment-*{_SUFFIX} files). Write one "
                       "with gradwatch.attach(model, log_dir=...) or KerasCallback(log_dir=...).")
    problems = []
    for path in reversed(found):  # the newest segment with an intact start wins
        records, damage = _read_records(path)
        try:
            return _rebuild(path, records, damage)
        except (LogError, KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            problems.append(f"{path.name}: {exc}")
    raise LogError(f"the gradwatch run log in {str(directory)!r} is damaged beyond repair: " + "; ".join(problems))


def _rebuild(path: Path, records: list[_Record], damage: str | None) -> RunLog:
    if not records or records[0].kind != HEADER:
        raise LogError("it does not start with a header record" + (f" ({damage})" if damage else ""))
    header = json.loads(records[0].payload)
    if header.get("format") != FORMAT_VERSION:
        raise LogError(f"format {header.get('format')!r} is not the one this gradwatch reads ({FORMAT_VERSION})")
    table = ParamTable.from_dict(header["table"])
    history = History(table, capacity=int(header.get("options", {}).get("history", 512)))
    verdicts, step, monitoring, final = None, 0, "on", None
    pending: list[StepBatch] = []  # a flush counts once its verdicts follow its statistics
    for rec in records[1:]:
        if rec.kind == SNAPSHOT:
            history = History.from_state(table, _unpack_arrays(rec.payload))
        elif rec.kind == STATS:
            arrays = _unpack_arrays(rec.payload)
            extras = {k[6:]: v for k, v in arrays.items() if k.startswith("extra_")}
            pending.append(StepBatch(steps=arrays["steps"], values=arrays["values"], skipped=arrays["skipped"],
                                     extras=extras))
        elif rec.kind == VERDICTS:
            d = json.loads(rec.payload)
            verdicts, step, monitoring = Verdicts.from_dict(d["verdicts"]), int(d["step"]), d["monitoring"]
            for batch in pending:
                history.extend(batch)
            pending.clear()
        elif rec.kind == CLOSE:
            final = json.loads(rec.payload)
    return RunLog(header=header, history=history, verdicts=verdicts, step=step, monitoring=monitoring,
                  final=final, damage=damage, segment=path)


def load_report(log_dir: str | os.PathLike) -> Report:
    """The :class:`Report` a run log holds: the final report when the watch ended cleanly, else the report
    rebuilt from the last intact flush, with a note saying so."""
    run = read_log(log_dir)
    if run.final is not None:
        return Report.from_dict(run.final)
    header = run.header
    notes = list(header.get("notes", ()))
    if run.damage:
        notes.append(f"The run log was damaged ({run.damage}); this report stops at the last intact record.")
    monitoring = run.monitoring
    if run.final is None:
        notes.append(f"The run log ends at step {run.step} without a final report: the process ended before "
                     "detach(), or is still training.")
        monitoring = f"interrupted at step {run.step}"
    structure = Structure.from_dict(header["structure"]) if header.get("structure") else None
    return build_report(framework=header["framework"], model_type=header["model_type"], step=run.step,
                        history=run.history, verdicts=run.verdicts, structure=structure, notes=tuple(notes),
                        monitoring=monitoring)


def __getattr__(name: str):
    # The writer moved to gradwatch.reporters.runlog with the other reporters; the old import path keeps working.
    if name == "RunLogWriter":
        from gradwatch.reporters.runlog import RunLogWriter

        return RunLogWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
