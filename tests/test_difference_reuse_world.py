"""Difference reuse in the alignment world (benchmarks/aw_difference_reuse.py), in-process on a
real ComfyUI: the reuse error is small, grows with k, and a broken reuse is caught."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

CFG = dict(points=4096, steps=20, ks=(1, 2, 3))
# |E[r] at k=2 − E[r] at k=1| in the ring world, dpmpp_2m, λ = 0.5: measured −0.008 at 8192 points
# and 30 steps (+0.024 without carrying the stale Δ to the current sigma); forgetting the
# difference (Δ = 0 on reuse steps) moves it by far more.
BOUND = 0.02


@pytest.fixture(scope="module")
def awk(comfy, pack):
    import aw_difference_reuse
    return aw_difference_reuse


def test_reuse_error_is_small_and_grows_with_k(awk, pack):
    cfg = replace(awk.Config(), **CFG)
    cell = awk.measure(pack, "ring", "dpmpp_2m", 0.5, cfg)
    errors = [abs(cell["k"][k]["vs1_err"]) for k in (2, 3)]
    assert cell["k"][1]["vs1_err"] == 0.0 and cell["k"][1]["vs1_sw"] == 0.0
    assert 0 < errors[0] < BOUND and errors[0] < errors[1], errors
    assert cell["k"][2]["vs1_sw"] < 0.1 and cell["k"][2]["vs1_tv"] < 0.05


def test_carrying_the_stale_difference_to_the_current_sigma_beats_reusing_it_as_it_is(awk, pack, monkeypatch):
    from comfyui_deradiff.sampler import difference_reuse
    cfg = replace(awk.Config(), **dict(CFG, ks=(1, 3)))
    carried = awk.measure(pack, "hard", "euler_ancestral", 0.5, cfg)["k"][3]["vs1_err"]
    monkeypatch.setattr(difference_reuse, "RESCALE_STALE", False)
    as_is = awk.measure(pack, "hard", "euler_ancestral", 0.5, cfg)["k"][3]["vs1_err"]
    assert abs(carried) < 0.25 * abs(as_is), (carried, as_is)


def test_a_reuse_that_forgets_the_difference_exceeds_the_bound(awk, pack, monkeypatch):
    from comfyui_deradiff.sampler import difference_reuse
    monkeypatch.setattr(difference_reuse.DifferenceMemory, "complete",
                        lambda self, outputs, side, lam, sigma=None: [o if o is None else
                                                          difference_reuse.complete(o, side, 0 * d, lam)
                                                          for o, d in zip(outputs, self.deltas)])
    cfg = replace(awk.Config(), **dict(CFG, ks=(1, 2)))
    cell = awk.measure(pack, "ring", "dpmpp_2m", 0.5, cfg)
    assert abs(cell["k"][2]["vs1_err"]) > BOUND, cell["k"][2]


def test_tiny_run_renders_the_table(awk, pack):
    res = awk.run(awk.TINY, pack, log=lambda *a: None)
    text = awk.render(res, "python benchmarks/aw_difference_reuse.py --tiny")
    assert "| ring | dpmpp_2m | 0.5 |" in text and "k = 2:" in text
    assert set(awk.verdict(res)) == {("ring", 2)}
