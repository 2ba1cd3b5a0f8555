from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..sampler.lambda_search import LambdaSearch
from ..sampler.plots import fmt_number, search_plot
from ..sampler.rewards import KINDS, RewardModelError
from ..sampler.search_run import (ImageSearchSetup, load_comfy_reward_model, register_reward_folder, reward_folders,
                                  reward_head_files, reward_path, run_search)
from .common import (NodeInputError, check_conditioning, combo_validation, check_latent, check_number, check_pair, pair_input,
                     sampler_inputs, schema)
from .particle_inputs import (check_particle_options, check_particles, particle_rule_input, particle_select_input,
                              particles_input, resample_ess_input)
from .v3_features import advanced

register_reward_folder()  # before the schemas list it

REWARD_TYPE = "DERADIFF_REWARD"
Reward = io.Custom(REWARD_TYPE)
NO_HEAD = "none"


def _mean_sem(values):
    t = torch.tensor(values, dtype=torch.float64)
    sem = float(t.std(unbiased=True)) / math.sqrt(len(t)) if len(t) > 1 else 0.0
    return float(t.mean()), sem


class DeRaDiffLoadRewardModel(io.ComfyNode):
    NODE = "DeRaDiff Load Reward Model"
    validate_inputs = combo_validation('kind', 'model', 'aesthetic_head')
    ABOUT = ("Loads a reward model from models/reward_models (or a reward_models path in "
             "extra_model_paths.yaml) to score images: PickScore, CLIP score, LAION aesthetic v2 or a small torch scorer. "
             "Nothing is downloaded; the README's FAQ ('λ Search') says where each file comes from.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffLoadRewardModel", cls.NODE, cls.ABOUT, [
            io.Combo.Input("kind", options=list(KINDS), tooltip=(
                "pickscore: PickScore_v1 (prompt-image preference; its folder needs the CLIP-ViT-H-14 "
                "processor files, beside the model or in processor/). clip_score: 100 x cosine of any "
                "transformers CLIP model. laion_aesthetic: the LAION aesthetic v2 MLP (aesthetic_head) "
                "on CLIP ViT-L/14 (model); ignores the prompt. torch_scorer: a small torch scorer folder "
                "(config.json + model.safetensors), e.g. the tiny family's colourfulness.")),
            io.Combo.Input("model", options=reward_folders(), tooltip=(
                "A transformers CLIP model folder (config.json, model.safetensors, preprocessor_config.json, "
                "tokenizer files) inside models/reward_models.")),
            io.Combo.Input("aesthetic_head", options=[NO_HEAD] + reward_head_files(), default=NO_HEAD, optional=True,
                           tooltip="laion_aesthetic only: the MLP file (e.g. sac+logos+ava1-l14-linearMSE.pth) "
                                   "in models/reward_models."),
        ], [Reward.Output(display_name="reward_model", tooltip="For DeRaDiff Reward Score and DeRaDiff λ Search.")])

    @classmethod
    def execute(cls, kind, model, aesthetic_head=NO_HEAD):
        folder = reward_path(model)
        if folder is None:
            raise NodeInputError(cls.NODE, "model", f"'{model}' was not found in models/reward_models. Put the "
                                 "folder there, then press R in ComfyUI to refresh the list.")
        head = None
        if kind == "laion_aesthetic":
            if aesthetic_head in (None, "", NO_HEAD):
                raise NodeInputError(cls.NODE, "aesthetic_head", "laion_aesthetic needs its MLP file; choose it here")
            head = reward_path(aesthetic_head)
            if head is None:
                raise NodeInputError(cls.NODE, "aesthetic_head", f"'{aesthetic_head}' was not found in models/reward_models")
        try:
            return io.NodeOutput(load_comfy_reward_model(kind, folder, head))
        except RewardModelError as e:
            where = "aesthetic_head" if head is not None and e.path == head else "model"
            raise NodeInputError(cls.NODE, where, str(e)) from None


def _prompt_lines(node, input_name, text) -> list[str]:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise NodeInputError(node, input_name, "give at least one prompt (one per line)")
    return lines


class DeRaDiffRewardScore(io.ComfyNode):
    NODE = "DeRaDiff Reward Score"
    ABOUT = "Scores images with a reward model: one score per image, and a summary on the node."

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffRewardScore", cls.NODE, cls.ABOUT, [
            io.Image.Input("images", tooltip="The images to score."),
            Reward.Input("reward_model", tooltip="From DeRaDiff Load Reward Model."),
            io.String.Input("prompt", multiline=True, default="", tooltip=(
                "The prompt the images were made from: one line for all images, or one line per image. "
                "Ignored by laion_aesthetic.")),
        ], [
            io.Float.Output(display_name="scores", is_output_list=True, tooltip="One score per image, in batch order."),
            io.String.Output(display_name="summary", tooltip="Mean, spread and every score, as text."),
        ], is_output_node=True)  # shows its summary even with nothing connected

    @classmethod
    def execute(cls, images, reward_model, prompt):
        if not hasattr(reward_model, "score"):
            raise NodeInputError(cls.NODE, "reward_model", f"expected a {REWARD_TYPE}, got {type(reward_model).__name__}")
        if getattr(images, "ndim", 0) != 4:
            raise NodeInputError(cls.NODE, "images", f"expected an IMAGE batch, got {type(images).__name__}")
        n = images.shape[0]
        if reward_model.uses_prompt:
            lines = _prompt_lines(cls.NODE, "prompt", prompt)
            if len(lines) not in (1, n):
                raise NodeInputError(cls.NODE, "prompt", f"{len(lines)} prompt lines for {n} images: give one, or one per image")
            prompts = lines * n if len(lines) == 1 else lines
        else:
            prompts = [""] * n
        scores = [float(s) for s in reward_model.score(images, prompts)]
        mean, sem = _mean_sem(scores)
        summary = (f"{reward_model.name}: mean {mean:.4g} ± {sem:.2g} (standard error) over {n} images\n"
                   + ", ".join(f"{s:.4g}" for s in scores))
        return io.NodeOutput(scores, summary, ui={"text": [summary]})


def particle_summary(particles: int, ess: dict) -> str:
    """One line over every particle run of a search: the lowest ESS, and how many runs collapsed."""
    runs = [r for per_lam in ess.values() for r in per_lam if r["weighted_steps"]]
    if not runs:
        return f"{particles} particles per image: weights uniform (λ = 0 or 1 only)"
    from ..sampler.particles import COLLAPSE_ESS  # DeRaDiff KSampler's rule: one particle held > 90 %
    collapsed = sum(r["min_ess"] < COLLAPSE_ESS for r in runs)
    return (f"{particles} particles per image: ESS min {min(r['min_ess'] for r in runs):.1f}, mean "
            f"{sum(r['mean_ess'] for r in runs) / len(runs):.1f} over {len(runs)} runs"
            + (f"; weights COLLAPSED in {collapsed} of them (ESS < {COLLAPSE_ESS:.2f})" if collapsed else ""))


class DeRaDiffLambdaSearch(io.ComfyNode):
    NODE = "DeRaDiff λ Search"
    validate_inputs = combo_validation('sampler_name', 'scheduler', 'particle_rule')
    ABOUT = ("Finds the λ that maximises a reward model: samples a few λ for every prompt and seed "
             "(one batched pass per round, as λ Sweep), fits a Gaussian process to the mean reward "
             "against λ (each λ's noise from the spread of its scores), and picks the next λ by the "
             "knowledge gradient, until the budget is spent. "
             "Returns the best λ (connect it to DeRaDiff KSampler's λ), a plot of reward against λ, "
             "the best λ's images and a table of every evaluation.")

    @classmethod
    def define_schema(cls):
        return schema("DeRaDiffLambdaSearch", cls.NODE, cls.ABOUT, [
            pair_input(),
            io.Clip.Input("clip", tooltip="Encodes each prompt (the reference's text encoder)."),
            io.Vae.Input("vae", tooltip="Decodes the samples for the reward model."),
            Reward.Input("reward_model", tooltip="The reward to maximise (DeRaDiff Load Reward Model)."),
            io.String.Input("prompts", multiline=True, default="a red fox in the snow\na lighthouse at dusk",
                            tooltip="One prompt per line; the reward is averaged over prompts and seeds."),
            io.Conditioning.Input("negative", tooltip="The negative conditioning, for every prompt."),
            io.Latent.Input("latent_image", tooltip="An empty latent: its size is the image size and its "
                                                    "batch size the number of seeds per prompt."),
            *sampler_inputs(("seed", "steps", "cfg", "sampler_name", "scheduler")),
            io.Float.Input("lambda_min", default=0.0, min=0.0, max=10.0, step=0.05,
                           tooltip="Lower end of the searched λ range."),
            io.Float.Input("lambda_max", default=3.0, min=0.0, max=10.0, step=0.05,
                           tooltip="Upper end of the searched λ range (past 2-3 images may degrade)."),
            io.Int.Input("budget", default=10, min=2, max=200, **advanced(),
                         tooltip="λ values to evaluate in all (each costs prompts x seeds images)."),
            io.Int.Input("lambdas_per_round", default=3, min=1, max=32, **advanced(),
                         tooltip="λ values sampled together in one batched pass per round "
                                 "(the first round takes up to 4 spread over the range)."),
            Reward.Input("watch_reward_model", optional=True, tooltip="A second metric to watch for reward hacking "
                                                                       "(plotted on its own axis, not maximised)."),
            io.Float.Input("beta", default=0.0, min=0.0, max=1e6, step=0.1, optional=True, tooltip=(
                "β the aligned model was trained at, for the β/λ axis. 0 = the pair loader's β "
                "(the editor fills it in), or none.")),
            io.Int.Input("max_lambdas_per_pass", default=0, min=0, max=256, optional=True, **advanced(),
                         tooltip="As in λ Sweep: 0 = as many λ per model call as fit in memory."),
            particles_input(tooltip=(
                "Particle realignment for every evaluated λ (as on DeRaDiff KSampler): each λ is sampled by "
                "N particles per image and the reward is scored on the drawn particle, so the score belongs to "
                "the model aligned at β/λ rather than to the plain mix's approximation of it (which misplaces "
                "mode weights when alignment reweights separate modes). Costs N times the model calls, and λ "
                "values run one at a time instead of batched. Needs euler_ancestral or ddpm. 1 = off.")),
            resample_ess_input(),
            particle_rule_input(),
            particle_select_input(),
        ], [
            io.Float.Output(display_name="best_lambda", tooltip="The λ with the highest predicted mean reward."),
            io.Image.Output(display_name="plot", tooltip=(
                "Reward against λ: GP mean and ±2σ band, the evaluated λ (mean ± standard error), "
                "the watched metric on its own axis, β/λ along the top when β is known.")),
            io.Image.Output(display_name="best_images", tooltip=(
                "Every prompt x seed at the best λ (sampled again unless the best λ was evaluated).")),
            io.String.Output(display_name="table", tooltip=(
                "Every evaluation: λ, β/λ, reward mean ± standard error, watched metric.")),
        ], is_experimental=True)  # while its caveats stand (README FAQ, λ Search)

    @classmethod
    def execute(cls, pair, clip, vae, reward_model, prompts, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, lambda_min, lambda_max, budget, lambdas_per_round, watch_reward_model=None, beta=0.0,
                max_lambdas_per_pass=0, **kwargs):
        check_pair(cls.NODE, pair)
        particles, resample_below = check_particles(cls.NODE, kwargs)
        particle_options = check_particle_options(cls.NODE, kwargs)
        if particles > 1:
            from ..sampler.particle_sampler import STOCHASTIC, refuse_sampler
            if sampler_name not in STOCHASTIC:
                refuse_sampler(cls.NODE, sampler_name)
        lambda_min = check_number(cls.NODE, "lambda_min", lambda_min, 0.0)
        lambda_max = check_number(cls.NODE, "lambda_max", lambda_max, 0.0)
        cfg = check_number(cls.NODE, "cfg", cfg)
        beta = check_number(cls.NODE, "beta", beta, 0.0)
        check_conditioning(cls.NODE, "negative", negative)
        check_latent(cls.NODE, "latent_image", latent_image)
        for name, value, method, kind in (("clip", clip, "tokenize", "CLIP"), ("vae", vae, "decode", "VAE"),
                                          ("reward_model", reward_model, "score", REWARD_TYPE),
                                          ("watch_reward_model", watch_reward_model, "score", REWARD_TYPE)):
            if (value is not None or name != "watch_reward_model") and not hasattr(value, method):
                raise NodeInputError(cls.NODE, name, f"expected a {kind}, got {type(value).__name__}")
        if not lambda_max > lambda_min:
            raise NodeInputError(cls.NODE, "lambda_max", f"must be above lambda_min ({lambda_min}), got {lambda_max}")
        lines = _prompt_lines(cls.NODE, "prompts", prompts)
        import nodes as comfy_nodes  # ComfyUI's own text encoding, as CLIPTextEncode does it
        positives = [comfy_nodes.CLIPTextEncode().encode(clip, text)[0] for text in lines]
        setup = ImageSearchSetup(pair, lines, positives, negative, latent_image, seed, steps, cfg, sampler_name,
                                 scheduler, vae, reward_model, watch_reward_model, max_lambdas_per_pass, int(budget),
                                 particles, resample_below, cls.NODE, particle_options=particle_options)
        search = LambdaSearch(float(lambda_min), float(lambda_max), int(budget), int(lambdas_per_round),
                              initial=min(4, int(budget)))
        result = run_search(search, setup.evaluate)
        beta = beta or getattr(pair, "beta", None) or None
        plot, table = cls._report(result, reward_model, watch_reward_model, beta)
        best_images = setup.images_at(result.best_lambda)
        text = f"best λ = {result.best_lambda:.4g} (predicted mean {result.best_mean:.4g})"
        if beta:
            text += f", emulating β/λ = {fmt_number(beta / result.best_lambda) if result.best_lambda else '∞'}"
        if particles > 1:
            text += "\n" + particle_summary(particles, setup.ess)
        return io.NodeOutput(result.best_lambda, plot, best_images, table, ui={"text": [text + "\n" + table]})

    @staticmethod
    def _report(result, reward, watch, beta):
        search = result.search
        gp = search.gp()
        grid = torch.linspace(search.lo, search.hi, 201, dtype=torch.float64)
        mean, std = gp.predict(grid)
        points = [(e.lam, *_mean_sem(e.scores)) for e in result.evaluations]
        watched = [(e.lam, *_mean_sem(e.watch)) for e in result.evaluations] if watch is not None else None
        plot = search_plot(search.lo, search.hi, grid.tolist(), mean.tolist(), std.tolist(), points, watched, beta,
                           result.best_lambda, reward.name, watch.name if watch is not None else "")
        rows = ["λ\tβ/λ\treward (mean ± s.e.)" + ("\twatched (mean ± s.e.)" if watched else "")]
        for i, (lam, m, e) in enumerate(sorted(points)):
            emulated = ("∞" if lam == 0 else fmt_number(beta / lam)) if beta else "-"
            row = f"{lam:.4g}\t{emulated}\t{m:.4g} ± {e:.2g}"
            if watched:
                wl = sorted(watched)[i]
                row += f"\t{wl[1]:.4g} ± {wl[2]:.2g}"
            rows.append(row)
        return torch.from_numpy(plot), "\n".join(rows)
