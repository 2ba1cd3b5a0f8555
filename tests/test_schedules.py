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


def linear_percent_to_sigma(p):
    """A toy noise schedule: sigma falls linearly from 10 at 0 % to 0 at 100 %."""
    return 10.0 * (1.0 - p)


PERCENT_OF = sch.PercentOfSigma(linear_percent_to_sigma)


def sigmas_for(steps):
    """Sigmas whose step k starts at k / steps of the way (like ComfyUI's 'simple' scheduler)."""
    return [linear_percent_to_sigma(k / steps) for k in range(steps)] + [0.0]


def test_progress_is_the_absolute_percent_of_the_sigma():
    assert sch.invert_percent(linear_percent_to_sigma, 10.0) == 0.0
    assert sch.invert_percent(linear_percent_to_sigma, 50.0) == 0.0
    assert sch.invert_percent(linear_percent_to_sigma, 6.0) == pytest.approx(0.4)
    assert sch.invert_percent(linear_percent_to_sigma, 0.0) == 1.0
    # a sigma object with .flatten (a tensor) works, and repeated sigmas are memoised
    class FakeTensor:
        def flatten(self):
            return [2.5]
    assert PERCENT_OF(FakeTensor()) == pytest.approx(0.75) and 2.5 in PERCENT_OF._memo


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
    five = sigmas_for(5)
    assert [custom.value_at(s, PERCENT_OF) for s in five[:-1]] == [0, 0, 1, 1, 0.5]
    # without a step clock (no sampler run: the preview's curve) a list of another length is spread over the progress
    stretched = sch.LambdaSchedule("custom", values=[0, 1])
    assert [stretched.value_at(s, PERCENT_OF) for s in five[:-1]] == [0, 0, 0, 1, 1]  # steps start at 0,20,40,60,80 %


def test_windows_are_half_open_and_absolute():
    """'First 40 %' of 20 steps is 8 steps, not 9; and it is the same 8 steps when the 20 are
    run as two stages of 10 (each stage sees only its own sigmas)."""
    first_40 = sch.LambdaSchedule("interval", 1.5, start_percent=0.0, end_percent=0.4, lambda_outside=0.0)
    twenty = sigmas_for(20)
    one_stage = [first_40.value_at(s, PERCENT_OF) for s in twenty[:-1]]
    assert one_stage == [1.5] * 8 + [0.0] * 12
    stage_1, stage_2 = twenty[:11], twenty[10:]
    two_stages = [first_40.value_at(s, PERCENT_OF) for s in stage_1[:-1]] + \
                 [first_40.value_at(s, PERCENT_OF) for s in stage_2[:-1]]
    assert two_stages == one_stage
    # a window that ends at 100 % includes the last step
    last = sch.LambdaSchedule("interval", 2.0, start_percent=0.5, end_percent=1.0, lambda_outside=0.0)
    assert [last.value_at(s, PERCENT_OF) for s in twenty[:-1]] == [0.0] * 10 + [2.0] * 10


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


# -- one value per sampler step (issue 20, item 6) ----------------------------------------------
KARRAS_LIKE = [14.6, 4.0, 0.9, 0.1, 0.0]  # unevenly spaced, as karras spaces them


def test_custom_values_are_taken_by_step_not_by_sigma_percent():
    """'1, 1, 0.5, 0' over 4 unevenly spaced steps: one value per step (by percent of sigma the old rule gave
    [1, 1, 0, 0] on karras 4 steps)."""
    sched = sch.LambdaSchedule("custom", values=[1, 1, 0.5, 0])
    position = sch.RunPosition(sch.PercentOfSigma(linear_percent_to_sigma), sch.StepClock(KARRAS_LIKE))
    got = []
    for sigma in KARRAS_LIKE[:-1]:
        position.place(sigma)
        got.append(sched.value_at(sigma, position))
    assert got == [1, 1, 0.5, 0]


def test_step_clock_offset_and_past_the_end():
    clock = sch.StepClock(KARRAS_LIKE[2:], offset=2)  # the second half of a split schedule
    sched = sch.LambdaSchedule("custom", values=[1, 0.9, 0.8, 0.7])
    position = sch.RunPosition(sch.PercentOfSigma(linear_percent_to_sigma), clock)
    position.place(0.9)
    assert sched.value_at(0.9, position) == 0.8
    position.place(0.1)
    assert sched.value_at(0.1, position) == 0.7
    longer = sch.RunPosition(None, sch.StepClock([9, 8, 7, 6, 5, 4, 0]))
    longer.place(4)
    assert sched.value_at(4, longer) == 0.7  # more steps than values: the last value holds


# (step, inner) of each evaluation of Heun over KARRAS_LIKE: the corrector belongs to the step it corrects
HEUN_PLACED = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False)]


def heun_placements(rounding=0.0):
    """Heun's evaluations as the sampler makes them: a step's first, its callback, then the corrector at the
    next sigma (times 1 + rounding) unless that is the end."""
    clock = sch.StepClock(KARRAS_LIKE, corrector_steps=True)
    placed = []
    for i in range(4):
        placed.append((clock.place(KARRAS_LIKE[i]), clock.inner))
        clock.on_step(i)
        if KARRAS_LIKE[i + 1] > 0:
            placed.append((clock.place(KARRAS_LIKE[i + 1] * (1 + rounding)), clock.inner))
    return placed


def test_step_clock_heun_corrector_and_midpoints():
    """Heun: callback after each step's first evaluation; the corrector lands exactly on the next sigma and
    belongs to the step it corrects; a midpoint evaluation (DPM-2) belongs to the step it lies in."""
    assert heun_placements() == HEUN_PLACED
    plain = sch.StepClock(KARRAS_LIKE)
    assert [plain.place(s) for s in (14.6, 8.0, 4.0, 2.0, 0.9)] == [0, 0, 1, 1, 2]
    assert not plain.inner


def test_step_clock_corrector_a_float_rounding_below_the_next_sigma():
    """The exponential Heun samplers (ComfyUI 0.33: exp_heun_2_x0, exp_heun_2_x0_sde) reach the next sigma through a
    log-SNR round trip, a rounding below or above it: that corrector is still its step's, and the next evaluation at
    the sigma itself opens the next step."""
    for rounding in (-3e-5, 3e-5):
        assert heun_placements(rounding) == HEUN_PLACED, rounding


def test_custom_schedule_describes_itself_per_sampler_step():
    text = sch.LambdaSchedule("custom", values=[1, 1, 0.5, 0]).describe()
    assert text == "λ per sampler step: 1, 1, 0.5, 0 (the last holds after step 4)"
