"""The run log: a compact, append-only record of a watch that :func:`gradwatch.load` turns back into a Report.

``attach(model, log_dir=...)`` (and ``KerasCallback(log_dir=...)``) adds a :class:`RunLogWriter`. Every flush it
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
import time
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
from gradwatch.reporters.base import Reporter

__all__ = ["RunLogWriter", "load_report", "read_log"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"GWL1"
_HEAD = struct.Struct("<4sBII")
HEADER, SNAPSHOT, STATS, VERDICTS, CLOSE = 1, 2, 3, 4, 5
_KIND_NAMES = {HEADER: "header", SNAPSHOT: "snapshot", STATS: "stats", VERDICTS: "verdicts", CLOSE: "close"}
_SUFFIX = ".gwlog"


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"segment-*{_SUFFIX}"))


def _pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class RunLogWriter(Reporter):
    """Appends a watch's statistics, verdicts and final report to ``log_dir`` (see the module docs).

    Args:
        log_dir: The directory; created if missing. An earlier gradwatch log in it is replaced.
        max_bytes: Disk the log may use, roughly: a new segment starts when the current one passes half of it
            (never below twice the size of one history snapshot). Defaults to 64 MiB.

    Example:
        >>> import tempfile, torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> d = tempfile.mkdtemp()
        >>> with gradwatch.attach(model, opt, reporters=[], log_dir=d):
        ...     for _ in range(30):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> gradwatch.load(d).step
        30
    """

    name = "runlog"

    def __init__(self, log_dir: str | os.PathLike, *, max_bytes: int = 64 << 20) -> None:
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path, received {log_dir!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1 << 16:
            raise ValueError(f"max_bytes must be an int >= 65536, received max_bytes={max_bytes!r}")
        self.dir = Path(log_dir)
        self.max_bytes = max_bytes
        self._file: io.BufferedWriter | None = None
        self._segment = 0
        self._size = 0
        self._snapshot_bytes = 0
        self._header: bytes | None = None
        self._findings_written = -1

    # -- reporter hooks ---------------------------------------------------------------------------------

    def on_attach(self, watcher) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise LogError(f"log_dir {str(self.dir)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in _segments(self.dir):
            old.unlink()

    def on_flush(self, watcher, rows) -> None:
        batch = watcher.last_batch
        if batch is None:
            return
        if self._file is None:
            self._open(watcher)
        self._append(STATS, _pack_arrays(_batch_arrays(batch)))
        self._append_verdicts(watcher)
        self._file.flush()
        if self._size > max(self.max_bytes // 2, 2 * self._snapshot_bytes):
            self._rotate(watcher)

    def on_findings(self, watcher, findings) -> None:
        # A flush with new statistics wrote its verdicts in on_flush, after the detector had judged everything,
        # new findings included; only findings that on_flush did not see (sampled activations alone) need a record.
        verdicts = watcher.verdicts()
        if self._file is not None and verdicts is not None and len(verdicts.findings) != self._findings_written:
            self._append_verdicts(watcher)
            self._file.flush()

    def on_close(self, watcher, report: Report) -> None:
        if self._file is None:
            if watcher.history is None:
                return
            self._open(watcher)
        self._append(CLOSE, json.dumps(report.to_dict()).encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    # -- internals ------------------------------------------------------------------------------------------

    def _open(self, watcher) -> None:
        adapter = watcher.adapter
        structure = adapter.structure
        header = {"format": FORMAT_VERSION, "framework": adapter.framework, "model_type": adapter.model_type,
                  "table": watcher.history.table.to_dict(),
                  "structure": structure.to_dict() if structure is not None else None,
                  "options": {"every": watcher.options.every, "flush_every": watcher.options.flush_every,
                              "history": watcher.options.history},
                  "notes": list(adapter.notes()), "created": time.time()}
        self._header = json.dumps(header).encode()
        self._new_segment()

    def _new_segment(self) -> None:
        self._segment += 1
        self._file = open(self.dir / f"segment-{self._segment:06d}{_SUFFIX}", "wb")  # noqa: SIM115
        self._size = 0
        self._append(HEADER, self._header)

    def _rotate(self, watcher) -> None:
        old = self._file
        old.flush()
        os.fsync(old.fileno())
        old.close()
        self._new_segment()
        snapshot = _pack_arrays(watcher.history.state())
        self._snapshot_bytes = len(snapshot)
        self._append(SNAPSHOT, snapshot)
        self._append_verdicts(watcher)
        self._file.flush()
        os.fsync(self._file.fileno())
        for path in _segments(self.dir)[:-1]:
            path.unlink()

    def _append_verdicts(self, watcher) -> None:
        verdicts = watcher.verdicts()
        if verdicts is None:
            return
        rec = {"step": watcher.step, "monitoring": watcher.monitoring, "verdicts": verdicts.to_dict()}
        self._append(VERDICTS, json.dumps(rec).encode())
        self._findings_written = len(verdicts.findings)

    def _append(self, kind: int, payload: bytes) -> None:
        head = _HEAD.pack(_MAGIC, kind, len(payload), zlib.crc32(payload))
        self._file.write(head)
        self._file.write(payload)
        self._size += len(head) + len(payload)


def _batch_arrays(batch: StepBatch) -> dict[str, np.ndarray]:
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
    segments = _segments(directory)
    if not segments:
        raise LogError(f"{str(directory)!r} holds no gradwatch run log (no segment-*{_SUFFIX} files). Write one "
                       "with gradwatch.attach(model, log_dir=...) or KerasCallback(log_dir=...).")
    problems = []
    for path in reversed(segments):  # the newest segment with an intact start wins
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
