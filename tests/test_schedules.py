"""λ schedules on their own (pure; loaded straight from the package files)."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    # sampler/schedules.py imports .mixing relatively: give it a minimal package
    pkg = types.ModuleType("deradiff_pure")
    pkg.__path__ = [str(ROOT / "sampler")]
    sys.modules.setdefault("deradiff_pure", pkg)
    for name in ("mixing", "schedules"):
        spec = importlib.util.spec_from_file_location(f"deradiff_pure.{name}", ROOT / "sampler" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"deradiff_pure.{name}"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["deradiff_pure.schedules"]


sch = _load()
SIGMAS = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]  # 5 steps, descending, ending in 0


def test_progress_follows_the_sampler_sigmas():
    assert sch.progress_at(14.6, SIGMAS) == 0.0
    assert sch.progress_at(20.0, SIGMAS) == 0.0
    assert sch.progress_at(3.0, SIGMAS) == pytest.approx(2 / 5)
    assert sch.progress_at(0.0, SIGMAS) == 1.0
    # between two sigmas: log-sigma interpolation (geometric midpoint is half a step)
    mid = (7.0 * 3.0) ** 0.5
    assert sch.progress_at(mid, SIGMAS) == pytest.approx(1.5 / 5)
    # the last interval ends at 0: linear there
    assert sch.progress_at(0.15, SIGMAS) == pytest.approx(4.5 / 5)
    # img2img: only the tail of the schedule is sampled, and progress is relative to it
    assert sch.progress_at(3.0, SIGMAS[2:]) == 0.0
    assert sch.progress_at(1.0, SIGMAS[2:]) == pytest.approx(1 / 3)


def test_shapes():
    lin = sch.LambdaSchedule("linear", 1.0, 0.0)
    assert [lin.at_progress(p) for p in (0, 0.25, 1)] == [1.0, 0.75, 0.0]
    cos = sch.LambdaSchedule("cosine", 0.0, 2.0)
    assert cos.at_progress(0.5) == pytest.approx(1.0) and cos.at_progress(0.25) < 0.5
    assert sch.LambdaSchedule("ease_in", 0.0, 1.0).at_progress(0.5) == pytest.approx(0.25)
    assert sch.LambdaSchedule("ease_out", 0.0, 1.0).at_progress(0.5) == pytest.approx(0.75)
    windowed = sch.LambdaSchedule("linear", 0.0, 1.0, start_percent=0.2, end_percent=0.6)
    assert [windowed.at_progress(p) for p in (0.1, 0.4, 0.9)] == [0.0, pytest.approx(0.5), 1.0]
    interval = sch.LambdaSchedule("interval", 1.5, start_percent=0.3, end_percent=0.7, lambda_outside=0.0)
    assert [interval.at_progress(p) for p in (0.1, 0.5, 0.8)] == [0.0, 1.5, 0.0]
    custom = sch.LambdaSchedule("custom", values=[0, 0, 1, 1, 0.5])
    assert [custom.value_at(s, SIGMAS) for s in SIGMAS[:-1]] == [0, 0, 1, 1, 0.5]
    # a Heun-like second evaluation at the next sigma already belongs to the next step
    assert custom.value_at(3.0, SIGMAS) == 1
    # a list of another length is stretched over the steps
    stretched = sch.LambdaSchedule("custom", values=[0, 1])
    assert [stretched.value_at(s, SIGMAS) for s in SIGMAS[:-1]] == [0, 0, 0, 1, 1]  # steps start at 0,20,40,60,80 %


def test_which_models_a_schedule_needs():
    assert not sch.LambdaSchedule("constant", 0.0).uses_aligned
    assert not sch.LambdaSchedule("constant", 1.0).uses_reference
    assert sch.LambdaSchedule("linear", 0.0, 1.0).uses_aligned
    assert sch.LambdaSchedule("interval", 1.0, lambda_outside=1.0, start_percent=0.2).uses_reference is False
    assert sch.LambdaSchedule("custom", values=[0, 0]).uses_aligned is False


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="end_percent"):
        sch.LambdaSchedule("linear", 0, 1, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="lambda"):
        sch.LambdaSchedule("custom", values=[1, -1])
    with pytest.raises(ValueError, match="shape"):
        sch.LambdaSchedule("zigzag")
    with pytest.raises(ValueError, match="'x' is not a number"):
        sch.parse_values("1, x")
    assert sch.parse_values("1, 0.5 0.25\n0") == [1.0, 0.5, 0.25, 0.0]
