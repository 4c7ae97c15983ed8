"""The run-log reporter: appends each flush to the format of :mod:`gradwatch.core.runlog`, which reads it back."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from gradwatch.core.report import Finding, Report
from gradwatch.core.runlog import (
    CLOSE,
    FORMAT_VERSION,
    HEADER,
    SNAPSHOT,
    STATS,
    VERDICTS,
    batch_arrays,
    frame,
    pack_arrays,
    segment_path,
    segments,
)
from gradwatch.errors import LogError
from gradwatch.reporters.base import Flush, Reporter, WatchInfo

__all__ = ["RunLogWriter"]


class RunLogWriter(Reporter):
    """Appends a watch's statistics, verdicts and final report to ``log_dir`` (format: :mod:`gradwatch.core.runlog`).

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
        self._info: WatchInfo | None = None
        self._last: Flush | None = None
        self._findings_written = -1

    # -- reporter hooks ---------------------------------------------------------------------------------

    def on_attach(self, info: WatchInfo) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise LogError(f"log_dir {str(self.dir)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in segments(self.dir):
            old.unlink()
        self._info = info

    def on_flush(self, flush: Flush) -> None:
        self._last = flush
        if flush.batch is None:
            return
        if self._file is None:
            self._open(flush)
        self._append(STATS, pack_arrays(batch_arrays(flush.batch)))
        self._append_verdicts(flush)
        self._file.flush()
        if self._size > max(self.max_bytes // 2, 2 * self._snapshot_bytes):
            self._rotate(flush)

    def on_findings(self, findings: Sequence[Finding], flush: Flush) -> None:
        # A flush with new statistics wrote its verdicts in on_flush, after the detector had judged everything,
        # new findings included; only findings that on_flush did not see (sampled activations alone) need a record.
        self._last = flush
        if self._file is not None and len(flush.verdicts.findings) != self._findings_written:
            self._append_verdicts(flush)
            self._file.flush()

    def on_close(self, report: Report) -> None:
        if self._file is None:
            if self._last is None:
                return
            self._open(self._last)
        self._append(CLOSE, json.dumps(report.to_dict()).encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    # -- internals ------------------------------------------------------------------------------------------

    def _open(self, flush: Flush) -> None:
        info = self._info or WatchInfo(framework="", model_type="")
        options = {k: info.options[k] for k in ("every", "flush_every", "history") if k in info.options}
        header = {"format": FORMAT_VERSION, "framework": info.framework, "model_type": info.model_type,
                  "table": flush.table.to_dict(),
                  "structure": flush.structure.to_dict() if flush.structure is not None else None,
                  "options": options, "notes": list(flush.notes), "created": time.time()}
        self._header = json.dumps(header).encode()
        self._new_segment()

    def _new_segment(self) -> None:
        self._segment += 1
        self._file = open(segment_path(self.dir, self._segment), "wb")  # noqa: SIM115
        self._size = 0
        self._append(HEADER, self._header)

    def _rotate(self, flush: Flush) -> None:
        old = self._file
        old.flush()
        os.fsync(old.fileno())
        old.close()
        self._new_segment()
        snapshot = pack_arrays(flush.history.state())
        self._snapshot_bytes = len(snapshot)
        self._append(SNAPSHOT, snapshot)
        self._append_verdicts(flush)
        self._file.flush()
        os.fsync(self._file.fileno())
        for path in segments(self.dir)[:-1]:
            path.unlink()

    def _append_verdicts(self, flush: Flush) -> None:
        rec = {"step": flush.step, "monitoring": flush.monitoring, "verdicts": flush.verdicts.to_dict()}
        self._append(VERDICTS, json.dumps(rec).encode())
        self._findings_written = len(flush.verdicts.findings)

    def _append(self, kind: int, payload: bytes) -> None:
        data = frame(kind, payload)
        self._file.write(data)
        self._size += len(data)
