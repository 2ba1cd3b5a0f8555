"""The alignment world benchmark: its closed-form math, its ComfyUI models, DeRaDiff's exactness
for Gaussian data through the real guider, and `benchmarks/alignment_world.py --tiny` end to end."""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import aw_world as aw  # noqa: E402

F64 = torch.float64
W = torch.tensor([0.6, 0.8], dtype=F64) * 1.3


def ring():
    return aw.ring(8, 1.3, (0.15, 0.2), weights=torch.arange(1, 9, dtype=F64))


# -- the closed-form tilt ------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_tilted_density_is_reference_times_exp_reward_over_beta(beta):
    """log p_beta(x) - log p_ref(x) - w.x/beta must be one constant (-log Z) everywhere."""
    ref = ring()
    tilted = ref.tilt(W, beta)
    g = torch.linspace(-3, 3, 61, dtype=F64)
    grid = torch.cartesian_prod(g, g)
    diff = tilted.log_prob(grid) - ref.log_prob(grid) - grid @ W / beta
    assert float(diff.std()) < 1e-9
    # and a wrong beta is detected
    wrong = ref.tilt(W, beta * 1.1).log_prob(grid) - ref.log_prob(grid) - grid @ W / beta
    assert float(wrong.std()) > 1e-3


def test_expected_reward_formula_matches_quadrature_and_sampling():
    ref, beta = ring(), 0.8
    tilted = ref.tilt(W, beta)
    formula = tilted.expected_reward(W)
    # quadrature of p_ref * exp(r/beta) on a fine grid (independent of the tilt formula)
    g = torch.linspace(-5, 5, 801, dtype=F64)
    grid = torch.cartesian_prod(g, g)
    logq = ref.log_prob(grid) + grid @ W / beta
    q = torch.softmax(logq, 0)
    assert abs(float(q @ (grid @ W)) - formula) < 1e-6
    # Monte Carlo: samples of the closed-form p_beta, and self-normalised importance weights on p_ref
    gen = torch.Generator().manual_seed(0)
    x, idx = tilted.sample(200_000, gen, labels=True)
    r = x @ W
    assert abs(float(r.mean()) - formula) < 4.5 * float(r.std()) / math.sqrt(len(r))
    freq = torch.bincount(idx, minlength=tilted.k).to(F64) / len(idx)
    assert float((freq - tilted.weights).abs().max()) < 0.01
    xr = ref.sample(400_000, gen)
    iw = torch.softmax(xr @ W / beta, 0)
    assert abs(float(iw @ (xr @ W)) - formula) < 0.02
    # the reward really moved
    assert formula - ref.expected_reward(W) > 0.3


def test_tilt_of_one_gaussian_is_the_shifted_gaussian():
    g = aw.gaussian([0.3, -0.1], 0.4).tilt(W, 2.0)
    torch.testing.assert_close(g.means[0], torch.tensor([0.3, -0.1], dtype=F64) + 0.4 * W / 2.0)
    assert float(g.s2[0]) == pytest.approx(0.4)


# -- the ideal mixture denoiser ---------------------------------------------------------------
def test_mixture_denoiser_limits_and_tweedie():
    world = ring().tilt(W, 1.0)
    x = 1.5 * torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(world.denoise(x, 1e-7), x, atol=1e-8, rtol=0)
    far = world.denoise(x, 1e4)
    torch.testing.assert_close(far, world.mean().expand_as(far), atol=1e-6, rtol=0)
    assert float((world.mean() - ring().mean()).norm()) > 0.1  # the tilt moved the mean
    # Tweedie: D(x, sigma) = x + sigma^2 grad log p_sigma(x), with p_sigma the noised mixture
    for sigma in (0.1, 0.5, 2.0):
        xg = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(world.log_prob(xg, sigma).sum(), xg)
        torch.testing.assert_close(world.denoise(x, sigma), x + sigma ** 2 * score, atol=1e-9, rtol=1e-9)
    # per-point sigmas are the same as one sigma at a time
    sig = torch.tensor([0.1, 2.0], dtype=F64).repeat_interleave(250)
    both = world.denoise(x, sig)
    torch.testing.assert_close(both[:250], world.denoise(x[:250], 0.1))
    torch.testing.assert_close(both[250:], world.denoise(x[250:], 2.0))


def test_per_step_mix_is_exact_for_one_gaussian_but_not_for_a_mixture():
    """The denoiser-level fact the benchmark measures: (1-lam) D_ref + lam D_beta = D_(beta/lam) for
    Gaussian data, not when the tilt reweights modes."""
    beta, lam = 1.0, 2.0
    x = 2.0 * torch.randn(400, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    for world, exact in ((aw.gaussian([0.2, 0.5], 0.3), True), (ring(), False)):
        for sigma in (0.2, 0.7, 3.0):
            mixed = torch.lerp(world.denoise(x, sigma), world.tilt(W, beta).denoise(x, sigma), lam)
            gap = float((mixed - world.tilt(W, beta / lam).denoise(x, sigma)).abs().max())
            assert (gap < 1e-12) if exact else (gap > 1e-2), (exact, sigma, gap)


def test_sliced_wasserstein_and_mode_weights():
    gen = torch.Generator().manual_seed(3)
    a = ring().sample(2000, gen)
    assert aw.sliced_wasserstein(a, a) == 0.0
    shift = torch.tensor([0.3, -0.4], dtype=F64)
    # a pure shift c gives sqrt(mean over directions of (c.d)^2) = |c| / sqrt(2)
    assert aw.sliced_wasserstein(a + shift, a) == pytest.approx(0.5 / math.sqrt(2), rel=1e-9)
    world = ring()
    x, idx = world.sample(20_000, gen, labels=True)
    assert float((aw.mode_weights(x, world) - torch.bincount(idx, minlength=8) / 20_000).abs().max()) < 2e-3
    assert aw.total_variation(world.weights, world.weights) == 0.0


def test_weight_interpolation_endpoints_and_midpoint():
    torch.manual_seed(0)
    a, b = aw.MLPDenoiser(8, 2), aw.MLPDenoiser(8, 2)
    for lam, want in ((0.0, a), (1.0, b)):
        got = aw.interpolate_weights(a, b, lam)
        for (k, v), w in zip(got.state_dict().items(), want.state_dict().values()):
            torch.testing.assert_close(v, w)
    mid = aw.interpolate_weights(a, b, 2.0).state_dict()
    for k, v in mid.items():
        torch.testing.assert_close(v, 2 * b.state_dict()[k] - a.state_dict()[k])


# -- through ComfyUI ---------------------------------------------------------------------------
def test_comfy_model_returns_the_ideal_denoiser(comfy):
    """The wrapped model (a real BaseModel with SD1.5's eps parameterisation) gives back D exactly."""
    import aw_comfy as ac
    world = ring().tilt(W, 1.0)
    patcher = ac.world_model(world.denoise)
    x = 1.7 * torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    for s in (1e-4, 0.3, 2.0, 1e4):
        sigma = torch.full((2,), s)
        out = patcher.model.apply_model(x, sigma, c_crossattn=torch.zeros(2, 1, 768),
                                        transformer_options={"sigmas": sigma})
        pts = x[:, :2].permute(0, 2, 3, 1).reshape(-1, 2).double()
        want = world.denoise(pts, s).reshape(2, 5, 6, 2).permute(0, 3, 1, 2)
        torch.testing.assert_close(out[:, :2].double(), want, atol=2e-5 * max(1.0, s), rtol=1e-5)
        torch.testing.assert_close(out[:, 2:].double(), x[:, 2:].double() / (1 + s ** 2), atol=2e-5 * max(1.0, s),
                                   rtol=1e-5)
    # sigma -> 0 returns x, large sigma the mixture mean
    tiny = patcher.model.apply_model(x, torch.full((2,), 1e-4), c_crossattn=torch.zeros(2, 1, 768),
                                     transformer_options={"sigmas": torch.full((2,), 1e-4)})
    torch.testing.assert_close(tiny, x, atol=1e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:Should have")  # torchsde's Brownian tree at the first sigma (dpmpp_2m_sde)
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_single_gaussian_deradiff_paths_equal_the_ideal_beta_over_lambda_model(pack, sampler):
    """2-D Gaussian world: DeRaDiff(ref, aligned at beta, lam) through the pack's KSampler node (its
    DeRaDiffGuider inside ComfyUI's sampler) follows the same paths as ComfyUI's KSampler on the ideal
    model aligned from scratch at beta/lam, same seed, including lam > 1."""
    import aw_comfy as ac
    beta = 0.7
    ref = aw.gaussian([0.5, -0.2], 0.3)
    pair = ac.make_pair(pack, ac.world_model(ref.denoise), ac.world_model(ref.tilt(W, beta).denoise), beta)
    latent = ac.empty_latent(48)
    aligned = ac.points_from_latent(pair.reference, ac.sample_plain(pair.aligned, latent, sampler, 8, 5))
    for lam in (0.25, 0.5, 1.5, 2.0, 3.0):
        got = ac.points_from_latent(pair.reference, ac.sample_deradiff(pack, pair, lam, latent, sampler, 8, 5))
        truth = ac.world_model(ref.tilt(W, beta / lam).denoise)
        want = ac.points_from_latent(truth, ac.sample_plain(truth, latent, sampler, 8, 5))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert float((got - aligned).abs().max()) > 1e-2  # not trivially the aligned model
        assert float(got.std()) > 0.2  # real samples, not a collapsed output


# -- the script end to end ---------------------------------------------------------------------
def test_alignment_world_tiny_writes_table_and_plots(comfy_root, tmp_path):
    from PIL import Image
    pages = [REPO / "README.md", REPO / "docs" / "alignment_world.md"]
    before = [hashlib.sha256(page.read_bytes()).hexdigest() for page in pages]
    out = subprocess.run([sys.executable, "benchmarks/alignment_world.py", "--tiny", "--out", str(tmp_path),
                          "--no-readme"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [hashlib.sha256(page.read_bytes()).hexdigest() for page in pages] == before  # --no-readme respected

    for name in ("alignment_world_reward.png", "alignment_world_samples.png", "alignment_world_modes.png"):
        img = Image.open(tmp_path / name).convert("RGB")
        assert img.width > 300 and img.height > 200
        assert len(img.getcolors(1 << 20) or range(1000)) > 10  # something was drawn

    import alignment_world
    res = json.loads((tmp_path / "alignment_world.json").read_text())
    lams = res["lambdas"]
    assert lams == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    world = alignment_world.World(alignment_world.TINY)
    for lam, ex in zip(lams, res["exact"]):
        assert ex["reward"] == pytest.approx(world.target(lam).expected_reward(world.w), abs=1e-12)
    assert set(res["ideal"]) >= {"euler_ancestral", "euler", "dpmpp_2m", "dpmpp_2m_sde"}
    assert res["gaussian"]["max_abs_diff"] < 1e-4 < res["gaussian"]["min_gap_to_aligned"]
    for rows in res["ideal"].values():
        for row in rows:
            if row["lam"] in (0.0, 1.0):  # one model runs: DeRaDiff is that model
                assert row["path_gap"] == 0.0
        assert any(row["path_gap"] > 0 for row in rows)
    assert [r["lam"] for r in res["mlp"]["rows"]] == lams

    md = (tmp_path / "alignment_world.md").read_text()
    assert md == alignment_world.render(res, "", res["runtime_s"])  # the md is the report of this JSON
    table = re.findall(r"^\| ([\d.]+) \| (∞|[\d.]+) \| ([\d.-]+) \(±", md, re.M)
    assert [float(t[0]) for t in table] == lams
    for (_, _, reward), ex in zip(table, res["exact"]):
        assert float(reward) == pytest.approx(ex["reward"], abs=6e-4)
    assert "![expected reward vs λ](alignment_world_reward.png)" in md
    assert out.stdout.count("| λ |") >= 3


def test_readme_section_is_replaced_between_the_markers_only(tmp_path):
    import alignment_world as awb
    text = f"# T\nbefore\n{awb.START}\nold stuff\n{awb.END}\nafter\n"
    readme = tmp_path / "README.md"
    readme.write_text(text)
    awb.write_readme("| new | table |\n", readme)
    assert readme.read_text() == f"# T\nbefore\n{awb.START}\n| new | table |\n{awb.END}\nafter\n"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit):
        awb.write_readme("x\n", readme)


def test_readme_sections_live_in_their_docs_pages():
    """The benchmarks write their sections into docs/ pages (not README.md), between markers found there,
    and the alignment world's image links resolve from that page."""
    import alignment_world
    import aw_difference_reuse
    for module, page in ((alignment_world, "alignment_world.md"), (aw_difference_reuse, "difference_reuse.md")):
        assert module.DOC == REPO / "docs" / page
        assert module.write_readme.__defaults__ == (module.DOC,)
        text = module.DOC.read_text(encoding="utf-8")
        assert text.count(module.START) == text.count(module.END) == 1
        assert text.index(module.START) < text.index(module.END)
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        assert module.START not in readme and module.END not in readme
    section = (REPO / "docs" / "alignment_world.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    assert images and all((REPO / "docs" / link).resolve().is_file() for link in images), images


def test_difference_reuse_readme_section_is_replaced_between_the_markers_only(tmp_path):
    import aw_difference_reuse as awk
    page = tmp_path / "page.md"
    page.write_text(f"# T\nbefore\n{awk.START}\nold stuff\n{awk.END}\nafter\n")
    awk.write_readme("| new | table |\n", page)
    assert page.read_text() == f"# T\nbefore\n{awk.START}\n| new | table |\n{awk.END}\nafter\n"
    page.write_text("# T\n")
    awk.write_readme("x\n", page)
    assert page.read_text() == f"# T\n\n## Difference reuse in the alignment world\n{awk.START}\nx\n{awk.END}\n"
