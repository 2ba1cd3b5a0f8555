"""Difference reuse in the alignment world (benchmarks/aw_difference_reuse.py), in-process on a
real ComfyUI: the --tiny configuration runs, its reuse error is small and grows with k, the plan
runs the model passes it says, and a broken reuse is caught."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

# |E[r] at k=2 − E[r] at k=1| in the ring world, dpmpp_2m, λ = 0.5, --tiny (2048 points, 20 steps):
# measured −0.012 on ComfyUI 0.3.75 and 0.33.0 (−0.008 in the full run: 16384 points, 30 steps).
# Forgetting the difference (Δ = 0 on reuse steps) measured −0.186 in the same configuration.
BOUND = 0.03


@pytest.fixture(scope="module")
def awk(comfy, pack):
    import torch
    import aw_difference_reuse
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs; small point sets gain nothing from more on a shared CPU
    yield aw_difference_reuse
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(awk, pack):
    return awk.run(awk.TINY, pack, log=lambda *a: None)


def test_tiny_reuse_error_is_small_grows_with_k_and_the_passes_are_counted(awk, tiny):
    (cell,) = tiny["cells"]
    assert (cell["world"], cell["sampler"], cell["lam"]) == ("ring", "dpmpp_2m", 0.5)
    k = cell["k"]
    assert k[1]["vs1_err"] == 0.0 and k[1]["vs1_sw"] == 0.0
    errors = [abs(k[2]["vs1_err"]), abs(k[3]["vs1_err"])]
    assert 0 < errors[0] < BOUND and errors[0] < errors[1] < 2 * BOUND, errors
    assert k[2]["vs1_sw"] < 0.05 and k[2]["vs1_tv"] < 0.03, k[2]
    # model passes per step, counted from the two models' calls: 20 steps, full every k-th
    # step from the first, plus the forced final steps
    assert k[1]["passes"] == 2.0
    assert k[2]["passes"] == pytest.approx((20 + 10) / 20) and k[3]["passes"] == pytest.approx((20 + 7) / 20)
    assert cell["final_full"]["2/1"]["passes"] == pytest.approx((20 + 11) / 20)
    assert abs(cell["final_full"]["2/1"]["vs1_err"]) < BOUND
    text = awk.render(tiny, "python benchmarks/aw_difference_reuse.py --tiny")
    assert "| ring | dpmpp_2m | 0.5 |" in text and "k = 2 (1.50 passes/step)" in text
    assert set(awk.verdict(tiny)) == {("ring", 2), ("ring", 3)}


def test_a_reuse_that_forgets_the_difference_exceeds_the_bound(awk, pack, monkeypatch):
    from comfyui_deradiff.sampler import difference_reuse
    monkeypatch.setattr(difference_reuse.DifferenceMemory, "complete",
                        lambda self, outputs, side, lam, sigma=None: [o if o is None else
                                                          difference_reuse.complete(o, side, 0 * d, lam)
                                                          for o, d in zip(outputs, self.deltas)])
    cfg = replace(awk.TINY, scratch=False)
    cell = awk.measure(pack, "ring", "dpmpp_2m", 0.5, cfg, ks=(1, 2), checks=False)
    assert abs(cell["k"][2]["vs1_err"]) > 3 * BOUND, cell["k"][2]


def test_carrying_the_stale_difference_to_the_current_sigma_beats_reusing_it_as_it_is(awk, pack):
    # hard world, euler_ancestral, λ = 0.5, k = 3, --tiny size: measured carried −0.005 (0.3.75) /
    # −0.001 (0.33.0), as it is +0.30 / +0.29
    cfg = replace(awk.TINY, scratch=False)
    carried = awk.measure(pack, "hard", "euler_ancestral", 0.5, cfg, ks=(1, 3), checks=False)["k"][3]["vs1_err"]
    as_is = awk.measure(pack, "hard", "euler_ancestral", 0.5, cfg, ks=(1, 3), rescale=False,
                        checks=False)["k"][3]["vs1_err"]
    assert abs(carried) < BOUND < 0.25 * abs(as_is), (carried, as_is)
