"""TensorBoard: gradwatch's series, findings and gradient-flow heatmap in an event file.

Written with tensorboard's own event writer and protos (no torch or TensorFlow needed), so PyTorch and Keras
runs write the same events:

- scalars ``gradwatch/grad_rms/<layer>``, ``gradwatch/update_ratio/<layer>`` and ``gradwatch/health/*`` once per
  flush, at the training step (the same series as the W&B reporter, :func:`~gradwatch.reporters.base.flush_scalars`);
- text ``gradwatch/findings`` (a markdown table of findings and recommendations) when a finding first appears and
  at the end, ``gradwatch/summary`` (the console summary) at the end;
- image ``gradwatch/flow`` (the gradient-flow heatmap; needs matplotlib) every ``image_every`` flushes and at the end.

Example:
    >>> from gradwatch.reporters.tensorboard import TensorBoardReporter
    >>> TensorBoardReporter(log_dir="runs/x", image_every=0)
    Traceback (most recent call last):
    ...
    ValueError: image_every must be an int >= 1, received image_every=0
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from gradwatch._optional import require
from gradwatch.core.report import Finding, Report
from gradwatch.reporters.base import Flush, Reporter, WatchInfo, flush_scalars, verdict_text

__all__ = ["TensorBoardReporter"]

log = logging.getLogger(__name__)


def default_log_dir() -> str:
    """``runs/<date>_<host>_gradwatch``, next to where ``SummaryWriter()`` writes by default."""
    return os.path.join("runs", f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}_gradwatch")


class TensorBoardReporter(Reporter):
    """Writes gradwatch's diagnosis to a TensorBoard event file.

    Select it with ``reporters=[..., "tensorboard"]`` (writes under :func:`default_log_dir`) or pass an instance
    to point it at your run's directory (``tensorboard --logdir`` shows it next to your own scalars).

    Args:
        log_dir: Directory for the event file. Defaults to ``runs/<date>_<host>_gradwatch``.
        prefix: Tag prefix. Defaults to ``"gradwatch"``.
        image_every: Write the gradient-flow heatmap every N flushes (and at the end). Defaults to ``10``.

    Raises:
        ImportError: tensorboard is not installed (``pip install 'gradwatch[tensorboard]'``).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike | None = None, *, prefix: str = "gradwatch",
                 image_every: int = 10) -> None:
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 1:
            raise ValueError(f"image_every must be an int >= 1, received image_every={image_every!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, received prefix={prefix!r}")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike) or None, received {log_dir!r}")
        require("tensorboard", extra="tensorboard", feature="TensorBoardReporter")
        self.log_dir = os.fspath(log_dir) if log_dir is not None else default_log_dir()
        self.prefix = prefix
        self.image_every = image_every
        self._writer: Any = None
        self._flushes = 0
        self._no_images = False

    # -- writing ---------------------------------------------------------------------------------------------

    def _write(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(self.log_dir)
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)

    def _scalar(self, tag: str, value: float):
        from tensorboard.compat.proto import summary_pb2

        return summary_pb2.Summary.Value(tag=f"{self.prefix}/{tag}", simple_value=float(value))

    def _text(self, tag: str, text: str):
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.text import plugin_data_pb2

        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="text", content=plugin_data_pb2.TextPluginData(version=0).SerializeToString()))
        tensor = tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        return summary_pb2.Summary.Value(tag=f"{self.prefix}/{tag}", metadata=meta, tensor=tensor)

    def _image(self, report: Report):
        if self._no_images or not report.trend_steps:
            return None
        try:
            from gradwatch.core.plots import flow_figure

            fig = flow_figure(report)
        except ImportError:
            self._no_images = True
            log.info("gradwatch: matplotlib is missing, so no gradient-flow image goes to TensorBoard "
                     "(pip install 'gradwatch[plot]')")
            return None
        from tensorboard.compat.proto import summary_pb2

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        width, height = (int(round(v)) for v in fig.canvas.get_width_height())
        return summary_pb2.Summary.Value(tag=f"{self.prefix}/flow", image=summary_pb2.Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=buf.getvalue()))

    # -- reporter hooks -------------------------------------------------------------------------------------

    def on_attach(self, info: WatchInfo) -> None:
        opts = ", ".join(f"{k}={v}" for k, v in info.options.items())
        self._write(0, [self._text("watch", f"{info.framework} {info.model_type}: {opts}")])

    def on_flush(self, flush: Flush) -> None:
        if flush.rows is None:
            return
        self._flushes += 1
        values = [self._scalar(k, v) for k, v in flush_scalars(flush).items()]
        if self._flushes % self.image_every == 0:
            image = self._image(flush.report())
            if image is not None:
                values.append(image)
        self._write(int(flush.rows.steps[-1]), values)

    def on_findings(self, findings: Sequence[Finding], flush: Flush) -> None:
        self._write(flush.step, [self._text("findings", findings_markdown(flush.report()))])

    def on_close(self, report: Report) -> None:
        values = [self._text("findings", findings_markdown(report)),
                  self._text("summary", "```\n" + str(report) + "\n```")]
        image = self._image(report)
        if image is not None:
            values.append(image)
        self._write(report.step, values)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def findings_markdown(report: Report) -> str:
    """The verdict, then the findings and the recommendations as markdown tables (TensorBoard's text tab)."""
    lines = [f"**{report.model_type}, step {report.step}: {verdict_text(report)}**", ""]
    if report.findings:
        lines += ["| kind | severity | since step | active | layers | message |", "|---|---|---|---|---|---|"]
        lines += [f"| {f.kind} | {f.severity} | {f.step} | {f.active} | {_cell(', '.join(f.layers[:8]))} | "
                  f"{_cell(f.message)} |" for f in report.findings]
    if report.recommendations:
        lines += ["", "| rank | fix | layers | reason |", "|---|---|---|---|"]
        lines += [f"| {r.rank} | {r.fix} | {_cell(', '.join(r.layers[:8]))} | {_cell(r.reason)} |"
                  for r in report.recommendations]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
