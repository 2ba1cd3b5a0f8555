"""The λ search through ComfyUI: (1) ground truth in the alignment world, through the pack's real
sweep path; (2) the three nodes on the SD1.5 stand-ins with tiny reward models the test writes."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import aw_world as aw  # noqa: E402

F64 = torch.float64

# -- 1. ground truth: a gold reward with an interior maximum ---------------------------------------
# One Gaussian reference N(m, s2 I); the aligned model is its tilt by the proxy reward w.x at BETA.
# DeRaDiff is exact for one Gaussian (test_alignment_world): at λ it samples N(m + s2 w λ/BETA, s2 I).
# The gold reward penalises drifting from the reference: r(x) = w.x - KAPPA |x - m|^2, so
#   E_λ[r] = w.m + s2 |w|^2 λ/BETA - KAPPA (s2^2 |w|^2 λ^2/BETA^2 + 2 s2),
# maximal at λ* = BETA / (2 KAPPA s2).
MEAN, S2, BETA, KAPPA = (0.5, -0.2), 0.3, 0.7, 0.9
W = torch.tensor([0.6, 0.8], dtype=F64) * 1.3
EXACT = BETA / (2 * KAPPA * S2)
LAMBDA_RANGE = (0.0, 3.0)
BUDGET = 10
TOLERANCE = 0.05  # on λ


def sampled_moments(lam: float, sigma_max: float):
    """Mean and per-axis variance of what ComfyUI's ODE samplers draw from N(m_λ, s2 I): they start
    from pure noise at sigma_max, not from the true marginal N(m_λ, s2 + sigma_max^2), and the
    exact flow shrinks that start's offset by g = sqrt(s2 / (s2 + sigma_max^2)): the mean is
    (1 - g) m_λ, the variance s2 sigma_max^2 / (s2 + sigma_max^2)."""
    g = math.sqrt(S2 / (S2 + sigma_max ** 2))
    m_lam = torch.tensor(MEAN, dtype=F64) + S2 * W * lam / BETA
    return (1 - g) * m_lam, S2 * sigma_max ** 2 / (S2 + sigma_max ** 2)


def sampled_gold(lam: float, sigma_max: float) -> float:
    mean, var = sampled_moments(lam, sigma_max)
    return float(W @ mean) - KAPPA * (float(((mean - torch.tensor(MEAN, dtype=F64)) ** 2).sum()) + 2 * var)


def argmax(f, lo=LAMBDA_RANGE[0], hi=LAMBDA_RANGE[1], points=30001) -> float:
    return max(torch.linspace(lo, hi, points, dtype=F64).tolist(), key=f)


def gold_reward(points: torch.Tensor) -> torch.Tensor:
    return points @ W - KAPPA * ((points - torch.tensor(MEAN, dtype=F64)) ** 2).sum(1)


def expected_gold(lam: float) -> float:
    w2 = float(W @ W)
    return float(W @ torch.tensor(MEAN, dtype=F64)) + S2 * w2 * lam / BETA - KAPPA * (S2 ** 2 * w2 * lam ** 2 / BETA ** 2 + 2 * S2)


@pytest.fixture(scope="module")
def world_pair(pack):
    import aw_comfy as ac
    ref = aw.gaussian(list(MEAN), S2)
    return ac.make_pair(pack, ac.world_model(ref.denoise), ac.world_model(ref.tilt(W, BETA).denoise), BETA)


def world_evaluate(pack, pair, seeds=4, points=4096, steps=24):
    """The search's evaluate(): the pack's λ sweep on the world models, one score per seed (the
    mean gold reward of that batch element's points)."""
    import aw_comfy as ac
    run = sys.modules[f"{pack.__name__}.sampler.search_run"]
    sweep = sys.modules[f"{pack.__name__}.sampler.sweep"]
    latent = ac.empty_latent(points, batch=seeds)
    cond = ac.conditioning()
    calls = []

    def evaluate(lams):
        calls.append(list(lams))
        # dpmpp_2m, 24 karras steps: its own error on the variance here is about 1 % (euler at 12: 25 %)
        out = sweep.lambda_sweep(pair, lams, 11, steps, 1.0, "dpmpp_2m", "karras", cond, cond, latent)["samples"]
        per = ac.points_from_latent(pair.reference, out).reshape(len(lams), seeds, -1, 2)
        return [run.Evaluation(lam, [float(gold_reward(p).mean()) for p in per[i]]) for i, lam in enumerate(lams)]
    return evaluate, calls


def test_exact_optimum_is_interior():
    assert abs(argmax(expected_gold) - EXACT) < 1e-3 and LAMBDA_RANGE[0] + 0.5 < EXACT < LAMBDA_RANGE[1] - 0.5
    # with an infinitely far start the sampler draws p_(β/λ) itself
    assert abs(argmax(lambda lam: sampled_gold(lam, 1e9)) - EXACT) < 1e-3


def test_search_finds_the_gold_optimum_in_the_alignment_world(pack, world_pair):
    """The search, driving the pack's λ sweep, finds the λ that maximises the gold reward of what the
    sampler draws (exact: sampled_moments), within TOLERANCE and BUDGET evaluations."""
    run = sys.modules[f"{pack.__name__}.sampler.search_run"]
    search_mod = sys.modules[f"{pack.__name__}.sampler.lambda_search"]
    sigma_max = float(world_pair.reference.get_model_object("model_sampling").sigma_max)
    exact_sampled = argmax(lambda lam: sampled_gold(lam, sigma_max))
    evaluate, calls = world_evaluate(pack, world_pair)
    search = search_mod.LambdaSearch(*LAMBDA_RANGE, budget=BUDGET, per_pass=3, initial=4)
    result = run.run_search(search, evaluate)
    evaluations = sum(len(c) for c in calls)
    grid_needs = math.ceil((LAMBDA_RANGE[1] - LAMBDA_RANGE[0]) / (2 * TOLERANCE)) + 1
    print(f"λ search in the alignment world: found λ={result.best_lambda:.3f}; exact λ* {exact_sampled:.3f} for "
          f"what the sampler draws (from pure noise at sigma_max {sigma_max:.2f}), {EXACT:.3f} for p_(β/λ) itself; "
          f"{evaluations} λ evaluations in {len(calls)} sweeps; a grid within ±{TOLERANCE} needs {grid_needs}")
    assert evaluations == BUDGET and len(calls) == 3  # 4 + 3 + 3
    assert abs(result.best_lambda - exact_sampled) <= TOLERANCE, (result.best_lambda, exact_sampled, sorted(search.xs))
    # every observation is the exact expectation up to sampling noise (about 0.01) and the
    # sampler's discretisation (about 1 % on the variance)
    for e in result.evaluations:
        observed = sum(e.scores) / len(e.scores)
        assert abs(observed - sampled_gold(e.lam, sigma_max)) < 0.03, (e.lam, observed, sampled_gold(e.lam, sigma_max))


# -- 2. the nodes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, comfy_root, comfy):
    """models/reward_models with a tiny CLIP folder and an aesthetic head, registered as ComfyUI does."""
    import folder_paths
    from test_rewards import write_aesthetic_head, write_clip_folder
    root = tmp_path_factory.mktemp("reward_models")
    write_clip_folder(root / "tiny-clip", Path(comfy_root) / "comfy" / "sd1_tokenizer")
    write_aesthetic_head(root / "tiny-aesthetic.safetensors")
    (root / "broken-clip").mkdir()
    (root / "broken-clip" / "config.json").write_text("{}")
    folder_paths.add_model_folder_path("reward_models", str(root))
    return root


def test_reward_nodes_list_load_and_score(pack, reward_dir):
    loader = pack.nodes.DeRaDiffLoadRewardModel
    choices = loader.INPUT_TYPES()
    assert "tiny-clip" in choices["required"]["model"][1]["options"]
    assert "tiny-aesthetic.safetensors" in choices["optional"]["aesthetic_head"][1]["options"]
    clip = loader.execute("clip_score", "tiny-clip")[0]
    aesthetic = loader.execute("laion_aesthetic", "tiny-clip", "tiny-aesthetic.safetensors")[0]
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    node = pack.nodes.DeRaDiffRewardScore()
    out = node.execute(images, clip, "a red fox")
    scores, summary = out.result
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores) and "mean" in summary
    direct = clip.reward.score(images, ["a red fox"] * 3)
    assert scores == pytest.approx(direct.tolist())
    per_line = node.execute(images, clip, "a red fox\na lighthouse\na bowl").result[0]
    assert per_line != pytest.approx(scores)
    assert len(node.execute(images, aesthetic, "").result[0]) == 3  # the aesthetic ignores the prompt
    errors = pack.nodes.common.NodeInputError
    with pytest.raises(errors, match="input 'prompt'.*2 prompt lines for 3 images"):
        node.execute(images, clip, "one\ntwo")
    with pytest.raises(errors, match="DeRaDiff Load Reward Model: input 'model'.*broken-clip"):
        loader.execute("pickscore", "broken-clip")
    with pytest.raises(errors, match="input 'aesthetic_head'"):
        loader.execute("laion_aesthetic", "tiny-clip")
    with pytest.raises(errors, match="input 'model'.*not found"):
        loader.execute("clip_score", "nowhere")


def test_lambda_search_node_on_sd15(pack, comfy, reward_dir):
    from comfy_helpers import empty_latent, encode, load_checkpoint
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    aligned = load_checkpoint("sd15_aligned.safetensors")[0]
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned, 5000.0)[0]
    loader = pack.nodes.DeRaDiffLoadRewardModel()
    reward = loader.execute("clip_score", "tiny-clip")[0]
    watch = loader.execute("laion_aesthetic", "tiny-clip", "tiny-aesthetic.safetensors")[0]
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    node = pack.nodes.DeRaDiffLambdaSearch()
    out = node.execute(pair, clip, vae, reward, "a red fox\na lighthouse", encode(clip, "blurry"), latent, 3, 2, 5.0,
                       "euler", "normal", 0.0, 2.0, 5, 2, watch_reward_model=watch)
    best, plot, images, table = out.result
    assert 0.0 <= best <= 2.0
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.shape[1] > 100
    assert images.shape[0] == 4 and images.shape[-1] == 3  # 2 prompts x 2 seeds at the best λ
    rows = table.splitlines()
    assert len(rows) == 1 + 5 and "watched" in rows[0]
    assert all(r.split("\t")[1] != "-" for r in rows[1:])  # β/λ is known (β = 5000)
    assert "best λ" in out.ui["text"][0]
    errors = pack.nodes.common.NodeInputError
    with pytest.raises(errors, match="input 'lambda_max'"):
        node.execute(pair, clip, vae, reward, "x", encode(clip, ""), latent, 3, 2, 5.0, "euler", "normal", 1.0, 1.0, 5, 2)
    with pytest.raises(errors, match="input 'lambda_min'"):
        node.execute(pair, clip, vae, reward, "x", encode(clip, ""), latent, 3, 2, 5.0, "euler", "normal",
                     float("nan"), 1.0, 5, 2)
    with pytest.raises(errors, match="input 'prompts'"):
        node.execute(pair, clip, vae, reward, " \n ", encode(clip, ""), latent, 3, 2, 5.0, "euler", "normal", 0.0, 1.0, 5, 2)


def test_lambda_search_with_particles(pack, comfy, reward_dir):
    """particles > 1: every evaluated λ is the particle mode's output for that λ (the same latents as
    DeRaDiff KSampler with the same particles, seed and settings), the reward is scored on them, the
    node reports the ESS; a deterministic sampler is refused naming the node and input."""
    from comfy_helpers import encode, load_checkpoint
    ref, clip, vae = load_checkpoint("sd15_reference.safetensors")
    aligned = load_checkpoint("sd15_aligned.safetensors")[0]
    pair = pack.nodes.DeRaDiffMakePair.execute(ref, aligned, 5000.0)[0]
    reward = pack.nodes.DeRaDiffLoadRewardModel.execute("clip_score", "tiny-clip")[0]
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    negative, positive = encode(clip, "blurry"), encode(clip, "a red fox")
    run = sys.modules[f"{pack.__name__}.sampler.search_run"]
    setup = run.ImageSearchSetup(pair, ["a red fox"], [positive], negative, latent, 3, 2, 5.0, "euler_ancestral",
                                 "normal", vae, reward, budget=2, particles=3)
    done = setup.evaluate([0.5, 1.5])
    ksampler = pack.nodes.DeRaDiffKSampler()
    for e in done:
        want = ksampler.execute(pair, 3, 2, 5.0, "euler_ancestral", "normal", positive, negative, latent,
                               **{"lambda": e.lam, "particles": 3}).result[0]["samples"]
        assert torch.equal(setup.latents[e.lam], want.cpu()), e.lam
        images = run.decode(vae, want)
        assert e.scores == pytest.approx(reward.score(images, ["a red fox"] * 2).tolist())
        assert [s["weighted_steps"] for s in setup.ess[e.lam]] == [1]  # euler_ancestral, 2 steps: one noisy step
    # the particle rule inputs reach every evaluated λ as they reach DeRaDiff KSampler
    options = {"particle_rule": "aligned proposal", "particle_select_sigma": 5.0}
    setup = run.ImageSearchSetup(pair, ["a red fox"], [positive], negative, latent, 3, 2, 5.0, "euler_ancestral",
                                 "normal", vae, reward, budget=1, particles=3,
                                 particle_options=pack.nodes.particle_inputs.check_particle_options("x", options))
    setup.evaluate([1.5])
    want = ksampler.execute(pair, 3, 2, 5.0, "euler_ancestral", "normal", positive, negative, latent,
                            **{"lambda": 1.5, "particles": 3, **options}).result[0]["samples"]
    assert torch.equal(setup.latents[1.5], want.cpu())
    assert setup.ess[1.5][0]["selected_at"] is not None
    node = pack.nodes.DeRaDiffLambdaSearch()
    with pytest.raises(ValueError, match="DeRaDiff λ Search: input 'particle_rule': the aligned proposal"):
        node.execute(pair, clip, vae, reward, "x", negative, latent, 3, 2, 5.0, "ddpm", "normal", 0.0, 2.0, 3, 2,
                     particles=2, particle_rule="aligned proposal")
    out = node.execute(pair, clip, vae, reward, "a red fox", negative, latent, 3, 2, 5.0, "euler_ancestral", "normal",
                       0.0, 2.0, 3, 2, particles=2)
    assert 0.0 <= out.result[0] <= 2.0
    assert "2 particles per image: ESS min" in out.ui["text"][0], out.ui["text"][0]
    errors = pack.nodes.common.NodeInputError
    with pytest.raises(ValueError, match="DeRaDiff λ Search: input 'sampler_name'.*stochastic"):
        node.execute(pair, clip, vae, reward, "x", negative, latent, 3, 2, 5.0, "euler", "normal", 0.0, 2.0, 3, 2,
                     particles=2)
    with pytest.raises(errors, match="DeRaDiff λ Search: input 'particles'"):
        node.execute(pair, clip, vae, reward, "x", negative, latent, 3, 2, 5.0, "euler_ancestral", "normal", 0.0, 2.0,
                     3, 2, particles=0)
    with pytest.raises(errors, match="DeRaDiff λ Search: input 'resample_ess'"):
        node.execute(pair, clip, vae, reward, "x", negative, latent, 3, 2, 5.0, "euler_ancestral", "normal", 0.0, 2.0,
                     3, 2, particles=2, resample_ess=1.5)
