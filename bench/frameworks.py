"""The setting behind a sync site in a training framework's own code, and for Lightning the user's `self.log` line.

A sync that a framework makes for the user is found at a line of the framework, reached from `trainer.fit(...)` or
`trainer.train()`: true, but nothing there to change. Where the framework's source makes it certain which of its
settings causes the read-back, `KNOWN` names that setting: a frame of the sync's stack whose module and function (and,
where the function syncs elsewhere too, the function it was calling or a piece of its running line) are an entry's.
Each entry was read in the framework's source (transformers 5.25, accelerate 1.16, lightning 2.6) and seen in a trace.

Lightning converts a metric logged with `self.log(..., prog_bar=True)` to a number when it collects the step's
metrics, long after `self.log` returned. While syncs are counted, `LogCalls` wraps `LightningModule.log` (when the
script has imported Lightning; loopmark never imports a framework) to remember the user's line of each `self.log`,
by hook and metric name, so that such a sync is attributed to that line rather than to `trainer.fit(...)`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NamedTuple


class Known(NamedTuple):
    """A framework frame whose read-back a setting causes. `file`: the module as an installed package's path shows it
    (`lightning/pytorch/trainer/connectors/logger_connector/result.py`); `function`: the frame's function; `setting`:
    what the user sets, and why it syncs; `callee`: the function the frame was calling, `code`: a piece of the line it
    was running (either or both, where the function reads back for other reasons too); `metric`: reads the (hook, name)
    of the metric being converted from the frame's locals, for a Lightning `self.log` line."""

    file: str
    function: str
    setting: str
    callee: str = ""
    code: str = ""
    metric: Callable[[dict], tuple] | None = None


def _lightning_metric(f_locals: dict) -> tuple | None:
    """(hook, name) of the `_ResultMetric` that `_ResultCollection.metrics` is converting."""
    meta = getattr(f_locals.get("result_metric"), "meta", None)
    fx, name = getattr(meta, "fx", None), getattr(meta, "name", None)
    return (fx, name) if isinstance(fx, str) and isinstance(name, str) else None


_LOGGER_CONNECTOR = "lightning/pytorch/trainer/connectors/logger_connector/"

KNOWN: tuple[Known, ...] = (
    # result.py, _ResultCollection.metrics: `if result_metric.meta.prog_bar: ... convert_tensors_to_scalars(value)`,
    # run whenever the step's metrics are collected (the logger connector's on_batch_end, the progress bar)
    Known(_LOGGER_CONNECTOR + "result.py", "metrics",
          "self.log(..., prog_bar=True): Lightning reads the metric back (.item()) for the progress bar each time it "
          "collects the step's metrics; prog_bar=False avoids it",
          callee="convert_tensors_to_scalars", metric=_lightning_metric),
    # logger_connector.py, log_metrics: `scalar_metrics = convert_tensors_to_scalars(metrics)`, every
    # `log_every_n_steps` steps when the Trainer has a logger
    Known(_LOGGER_CONNECTOR + "logger_connector.py", "log_metrics",
          "self.log(..., logger=True) (the default) with a logger: every logged metric is read back (.item()) each "
          "Trainer(log_every_n_steps=...) steps",
          callee="convert_tensors_to_scalars"),
    # trainer.py, _run_epoch: `self.args.logging_nan_inf_filter and ... (torch.isnan(tr_loss_step) or
    # torch.isinf(tr_loss_step))`, after every micro-batch's training_step
    Known("transformers/trainer.py", "_run_epoch",
          "TrainingArguments(logging_nan_inf_filter=True) (the default): each micro-batch's loss is tested with "
          "torch.isnan / torch.isinf and read back; logging_nan_inf_filter=False removes it",
          code="torch.isnan("),
    # trainer.py, _maybe_log_save_evaluate: `nested_gather(tr_loss, ...).mean().item()` and `grad_norm.item()`
    Known("transformers/trainer.py", "_maybe_log_save_evaluate",
          "TrainingArguments(logging_steps=...): the running loss and the gradient norm are read back (.item()) at "
          "each logging step",
          code=".item()"),
    # data_loader.py, DataLoaderShard.__iter__: `send_to_device(current_batch, self.device,
    # non_blocking=self._non_blocking)`, `_non_blocking` False unless configured
    Known("accelerate/data_loader.py", "__iter__",
          "a blocking copy of each batch to the device: accelerate's DataLoaderConfiguration(non_blocking=True) "
          "(Trainer: TrainingArguments(accelerator_config={\"non_blocking\": True}) with dataloader_pin_memory=True) "
          "copies it without waiting",
          callee="send_to_device"),
)

_BY_PLACE: dict[tuple[str, str], list[Known]] = {}
for _known in KNOWN:
    _BY_PLACE.setdefault((_known.file, _known.function), []).append(_known)


def lookup(file: str | None, function: str, callee: str, code: Callable[[], str]) -> Known | None:
    """The entry of `KNOWN` that a frame is: its module as `bench.syncs._library_part` gives it (None for a file outside
    an installed package), its function, the function it was calling, and (read only where needed) its running line."""
    for known in _BY_PLACE.get((file, function), ()) if file else ():
        if (not known.callee or known.callee == callee) and (not known.code or known.code in code()):
            return known
    return None


class LogCalls:
    """While entered, `LightningModule.log` is wrapped (where the script has imported Lightning) to remember, by
    (hook, metric name), where the user's code called it: `where(frame)` ((file:line, code) of the nearest frame of the
    user's code, `bench.syncs`'s) is asked from the frame that called `self.log`."""

    MODULES = ("lightning.pytorch.core.module", "pytorch_lightning.core.module")

    def __init__(self, where: Callable):
        self.where = where
        self.calls: dict[tuple, tuple[str, str]] = {}
        self._saved: list = []

    def __enter__(self):
        self.arm()
        return self

    def arm(self) -> None:
        """Wrap `LightningModule.log` if the script has imported Lightning by now and it is not wrapped yet: a counter
        entered before the script's imports arms it again when its count begins."""
        for name in self.MODULES:
            cls = getattr(sys.modules.get(name), "LightningModule", None)
            log = getattr(cls, "log", None)
            if log is not None and not getattr(log, "_loopmark_log", False):
                self._saved.append((cls, log))
                cls.log = self._wrap(log)

    def __exit__(self, *exc):
        for cls, log in reversed(self._saved):
            cls.log = log
        self._saved = []
        return False

    def _wrap(self, log):
        calls, where = self.calls, self.where

        @functools.wraps(log)
        def wrapped(module, name, *args, **kwargs):
            found = where(sys._getframe(1))
            if found is not None:
                calls[getattr(module, "_current_fx_name", None), name] = found
            return log(module, name, *args, **kwargs)

        wrapped._loopmark_log = True
        return wrapped

    def logged_at(self, metric: tuple | None) -> tuple[str, str] | None:
        """(file:line, code) of the user's `self.log` of this (hook, name), if one was seen."""
        return self.calls.get(metric) if metric else None
