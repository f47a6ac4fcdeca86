"""NVTX ranges and the profiling window, on CPU with torch.cuda's profiler and NVTX calls replaced by recorders.

* without CUDA, ranges never touch torch.cuda.nvtx (a call would raise here), as context managers and decorators;
* when enabled, ranges push and pop in nesting order, also when the block raises, and `annotate_module` puts a
  range around each call of the methods it wraps (surviving deepcopy, removable);
* the window starts the CUDA profiler right before step A and stops it right after step B-1 (synchronizing on
  each side), starts at once when a run resumes inside the window, and does nothing on CPU.
"""
import pytest
import torch
import torch.nn as nn

from coredi_fast import profiling
from coredi_fast.profiling import ProfilerWindow, annotate_module, nvtx_range


@pytest.fixture
def events(monkeypatch):
    """Replace torch.cuda's NVTX / profiler / synchronize with recorders; restore the enabled flag after."""
    log = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: log.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: log.append(("pop",)))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: log.append(("start",)))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: log.append(("stop",)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync",)))
    yield log
    profiling.set_nvtx_enabled(None)


def test_ranges_are_no_ops_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    monkeypatch.delenv("COREDI_NVTX", raising=False)
    profiling.set_nvtx_enabled(None)

    def fail(*args):
        raise AssertionError("torch.cuda.nvtx called on a CPU-only machine")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", fail)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", fail)

    @nvtx_range("decorated")
    def work(x):
        with nvtx_range("inner"):
            return x + 1

    with nvtx_range("outer"):
        assert work(1) == 2
    assert profiling.nvtx_enabled() is False


def test_ranges_nest_and_pop_on_errors(events):
    profiling.set_nvtx_enabled(True)

    @nvtx_range("decorated")
    def work():
        with nvtx_range("inner"):
            events.append(("work",))

    with nvtx_range("outer"):
        work()
        with pytest.raises(KeyError):
            with nvtx_range("failing"):
                raise KeyError("x")
    assert events == [("push", "outer"), ("push", "decorated"), ("push", "inner"), ("work",), ("pop",), ("pop",),
                      ("push", "failing"), ("pop",), ("pop",)]


def test_a_range_entered_while_disabled_does_not_pop_after_enabling(events):
    profiling.set_nvtx_enabled(False)
    with nvtx_range("a"):
        profiling.set_nvtx_enabled(True)
        with nvtx_range("b"):
            pass
    assert events == [("push", "b"), ("pop",)]


def test_annotate_module_wraps_each_call_and_is_removable(events):
    profiling.set_nvtx_enabled(True)

    class Net(nn.Sequential):
        def forward_tokens(self, x):  # a second entry point, as SiT's (the fused embedding calls it directly)
            return self[0](x)

    model = Net(nn.Linear(2, 2), nn.ReLU())
    handle = annotate_module(model, "net", methods=("forward", "forward_tokens"))
    with nvtx_range("forward"):
        out = model(torch.ones(1, 2))
    model.forward_tokens(torch.ones(1, 2))
    assert events == [("push", "forward"), ("push", "net"), ("pop",), ("pop",), ("push", "net"), ("pop",)]
    torch.testing.assert_close(out, torch.relu(model[0](torch.ones(1, 2))))
    copy = __import__("copy").deepcopy(model)  # the copy's wrapper calls the copy, not the original
    with torch.no_grad():
        copy[0].weight.zero_(), copy[0].bias.fill_(-1.0)
    assert float(copy(torch.ones(1, 2)).detach().abs().sum()) == 0.0
    handle.remove()
    events.clear()
    model(torch.ones(1, 2))
    model.forward_tokens(torch.ones(1, 2))
    assert events == [] and "forward" not in model.__dict__


def run_loop(window, first_step, last_step, log):
    """The training loop's use of the window: before_step(steps done), the step, after_step(steps done)."""
    for step in range(first_step, last_step):
        window.before_step(step)
        log.append(("step", step))
        window.after_step(step + 1)
    window.close()


def test_window_captures_exactly_steps_a_to_b(events):
    window = ProfilerWindow.parse("3:6", torch.device("cuda"))  # a device object only; nothing runs on it
    run_loop(window, 0, 9, events)
    assert events == [("step", 0), ("step", 1), ("step", 2), ("sync",), ("start",), ("step", 3), ("step", 4),
                      ("step", 5), ("sync",), ("stop",), ("step", 6), ("step", 7), ("step", 8)]


def test_window_resumed_inside_starts_at_once_and_closes_at_the_end(events):
    window = ProfilerWindow(3, 10, torch.device("cuda"))
    run_loop(window, 5, 8, events)  # resumed at step 5, the run ends at 8 inside the window
    assert events == [("sync",), ("start",), ("step", 5), ("step", 6), ("step", 7), ("sync",), ("stop",)]


def test_window_is_inactive_on_cpu_and_checks_its_bounds(events):
    run_loop(ProfilerWindow(0, 2, torch.device("cpu")), 0, 4, events)
    assert events == [("step", 0), ("step", 1), ("step", 2), ("step", 3)]
    assert ProfilerWindow.parse(None, torch.device("cuda")) is None
    with pytest.raises(ValueError, match="run.profile_steps"):
        ProfilerWindow.parse("5", torch.device("cuda"))
    with pytest.raises(ValueError, match="start < stop"):
        ProfilerWindow(4, 4, torch.device("cuda"))
    with pytest.raises(ValueError, match="non-empty name"):
        nvtx_range("")
