"""A sync a framework makes for the user names the setting behind it (`bench.frameworks.KNOWN`), and a Lightning
metric's read-back names the user's `self.log(...)` line rather than `trainer.fit(...)`. The table's lookup and the
attribution run here on stand-in frames and a stand-in package laid out as the framework's; the real frameworks are
traced where they are installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import trace
from bench.frameworks import KNOWN, LogCalls, lookup
from bench.syncs import SyncCounter, site_details

SCRIPTS = Path(__file__).parent / "scripts"
RESULT = "lightning/pytorch/trainer/connectors/logger_connector/result.py"


def never() -> str:
    raise AssertionError("the running line is read only for an entry that needs it")


def test_a_frame_is_an_entry_only_with_its_module_function_and_callee_or_line():
    prog_bar = lookup(RESULT, "metrics", "convert_tensors_to_scalars", never)
    assert prog_bar is not None and "prog_bar=True" in prog_bar.setting
    assert lookup(RESULT, "metrics", "_get_cache", never) is None  # another read-back of the same function
    assert lookup(RESULT, "log", "convert_tensors_to_scalars", never) is None
    assert lookup(None, "metrics", "convert_tensors_to_scalars", never) is None  # the user's own `metrics`
    nan_check = lookup("transformers/trainer.py", "_run_epoch", "",
                       lambda: "and (torch.isnan(tr_loss_step) or torch.isinf(tr_loss_step))")
    assert nan_check is not None and "logging_nan_inf_filter" in nan_check.setting
    assert lookup("transformers/trainer.py", "_run_epoch", "", lambda: "self.current_flos += float(x)") is None
    assert len({(k.file, k.function, k.callee, k.code) for k in KNOWN}) == len(KNOWN)


# a package laid out as Lightning's: its `metrics` converts a prog_bar metric with `.item()` after `log` returned
FAKE_RESULT = """\
class Meta:
    def __init__(self, fx, name):
        self.fx, self.name = fx, name


class Metric:
    def __init__(self, fx, name, value):
        self.meta, self.value = Meta(fx, name), value


def convert_tensors_to_scalars(value):
    return value.item()


def metrics(collection):
    out = {}
    for result_metric in collection:
        out[result_metric.meta.name] = convert_tensors_to_scalars(result_metric.value)
    return out
"""

USER = """\
def training_step(module, result, x):
    module.log("loss", x.sum(), prog_bar=True)
    module.log("other", x.mean())


def end_of_step(result, collection):
    return result.metrics(collection)
"""


@pytest.fixture
def lightning_like(tmp_path, monkeypatch):
    """(the stand-in `result` module, a LightningModule-like class whose `log` records, the user's module and file)."""
    path = tmp_path / "site-packages" / RESULT
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_RESULT)
    spec = importlib.util.spec_from_file_location("fake_lightning_result", path)
    result = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(result)

    class Module:
        _current_fx_name = "training_step"

        def __init__(self):
            self.logged = {}

        def log(self, name, value, prog_bar=False):
            self.logged[name] = Metric(self._current_fx_name, name, value, prog_bar)

    def Metric(fx, name, value, prog_bar):
        metric = result.Metric(fx, name, value)
        metric.prog_bar = prog_bar
        return metric

    home = types.ModuleType("fake_lightning_module")
    home.LightningModule = Module
    monkeypatch.setitem(sys.modules, "fake_lightning_module", home)
    monkeypatch.setattr(LogCalls, "MODULES", ("fake_lightning_module",))
    user = tmp_path / "project" / "userlit.py"
    user.parent.mkdir()
    user.write_text(USER)
    monkeypatch.syspath_prepend(str(user.parent))
    monkeypatch.delitem(sys.modules, "userlit", raising=False)
    import userlit

    return result, Module, userlit, user


def test_a_metric_read_back_after_log_returned_names_the_users_log_line_and_the_setting(lightning_like):
    result, Module, userlit, user = lightning_like
    counter = SyncCounter(torch.device("cpu"))
    module, x = Module(), torch.ones(3)
    counter.track(x)
    with counter:
        userlit.training_step(module, result, x)
        userlit.end_of_step(result, [m for m in module.logged.values() if m.prog_bar])
    [detail] = site_details(counter.sites, counter.site_kinds, 1, counter.site_code)
    log_line = next(i for i, line in enumerate(user.read_text().splitlines(), 1) if 'log("loss"' in line)
    assert detail["site"] == f"<site-packages>/{RESULT}:12 from userlit.py:{log_line}"
    assert detail["caller_code"] == 'module.log("loss", x.sum(), prog_bar=True)'
    assert "prog_bar=True" in detail["setting"]
    assert not getattr(Module.log, "_loopmark_log", False)  # unwrapped once counting ended


def test_without_a_recorded_log_the_read_back_is_the_users_nearest_line_with_the_setting(lightning_like):
    """A metric logged before the watch was armed: the site is the user's line that reached the framework."""
    result, Module, userlit, user = lightning_like
    module, x = Module(), torch.ones(3)
    userlit.training_step(module, result, x)  # not counted: no `self.log` recorded
    counter = SyncCounter(torch.device("cpu"))
    counter.track([m.value for m in module.logged.values()])
    with counter:
        userlit.end_of_step(result, [m for m in module.logged.values() if m.prog_bar])
    [detail] = site_details(counter.sites, counter.site_kinds, 1, counter.site_code)
    step_line = next(i for i, line in enumerate(user.read_text().splitlines(), 1) if "result.metrics(" in line)
    assert detail["site"].endswith(f" from userlit.py:{step_line}") and "prog_bar=True" in detail["setting"]


def _traced(tmp_path, monkeypatch, source: str, args=()) -> dict:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(source)
    return trace.trace(trace.script_target(str(script), list(args)), steps=2, warmup=2).record


def test_real_lightning_names_the_self_log_line_with_prog_bar(tmp_path, monkeypatch):
    """Lightning on the stand-in GPU: its progress bar's `.item()` of the metric is the user's `self.log` line."""
    pytest.importorskip("lightning")
    source = (SCRIPTS / "lightning_module.py").read_text().replace('accelerator="cpu"', 'accelerator="auto"')
    r = _traced(tmp_path, monkeypatch, source)
    assert r["reached_device"] is True
    log_line = next(i for i, line in enumerate(source.splitlines(), 1) if "self.log(" in line)
    [site] = [d for d in r["sync_site_details"] if "apply_func.py" in d["site"]]
    assert site["site"].endswith(f" from train.py:{log_line}") and site["per_step"] == 2
    assert site["caller_code"] == 'self.log("train_loss", loss, prog_bar=True)'
    assert "prog_bar=True" in site["setting"]
    assert f"setting behind {site['site']}: self.log(..., prog_bar=True)" in trace.summary(r)


def test_real_trainer_names_its_settings(tmp_path, monkeypatch):
    """The Hugging Face Trainer on the stand-in GPU, logging every step: the inf/NaN filter of each micro-batch's loss,
    the loss and gradient norm read back at each logging step, accelerate's blocking batch copies."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    source = (SCRIPTS / "hf_trainer_accumulation.py").read_text()
    source = source.replace(" use_cpu=True,", "").replace("logging_steps=50", "logging_steps=1")
    r = _traced(tmp_path, monkeypatch, source)
    for piece, setting in (("torch.isnan(tr_loss_step)", "logging_nan_inf_filter"),
                           ("tr_loss_scalar =", "logging_steps"), ("grad_norm.item()", "logging_steps"),
                           ("tensor.to(device", "non_blocking")):
        [site] = [d for d in r["sync_site_details"] if piece in d["code"]]
        assert setting in site.get("setting", ""), site
