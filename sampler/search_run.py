"""The λ search in ComfyUI: each round samples a batch of λ in one sweep, decodes, scores and tells
the Gaussian process (sampler/lambda_search.py); reward models run under ComfyUI's memory management."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher

from .lambda_search import LambdaSearch
from .rewards import KINDS, RewardModel, load_reward_model  # noqa: F401  (KINDS: for the node)
from .sweep import lambda_sweep

log = logging.getLogger("DeRaDiff")

REWARD_FOLDER = "reward_models"
HEAD_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")


# -- reward models as ComfyUI models --------------------------------------------------------
def register_reward_folder():
    """models/reward_models, plus any `reward_models:` entry of extra_model_paths.yaml."""
    import folder_paths
    folder_paths.add_model_folder_path(REWARD_FOLDER, os.path.join(folder_paths.models_dir, REWARD_FOLDER),
                                       is_default=True)


def reward_folders() -> list[str]:
    """Model folders (holding a config.json) under every reward_models path, relative names."""
    import folder_paths
    files = folder_paths.get_filename_list(REWARD_FOLDER)
    return sorted({os.path.dirname(f) for f in files if os.path.basename(f) == "config.json" and os.path.dirname(f)})


def reward_head_files() -> list[str]:
    import folder_paths
    return [f for f in folder_paths.get_filename_list(REWARD_FOLDER)
            if f.lower().endswith(HEAD_EXTENSIONS) and "/" not in f.replace("\\", "/")]


def reward_path(name: str) -> str | None:
    import folder_paths
    for base in folder_paths.get_folder_paths(REWARD_FOLDER):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    return None


class _Held(torch.nn.Module):
    """A plain container: ModelPatcher writes attributes (device, ...) that transformers models
    keep as read-only properties."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


class ComfyRewardModel:
    """A RewardModel whose torch modules ComfyUI loads and offloads like its own models."""

    def __init__(self, reward: RewardModel):
        self.reward = reward
        load, offload = mm.get_torch_device(), mm.unet_offload_device()
        core = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
        self.patchers = [core(_Held(module), load_device=load, offload_device=offload) for module in reward.modules()]

    @property
    def name(self) -> str:
        return f"{self.reward.kind}: {self.reward.name}"

    @property
    def uses_prompt(self) -> bool:
        return self.reward.uses_prompt

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # whole: transformers layers cannot run partly offloaded like ComfyUI's own layers
        mm.load_models_gpu(self.patchers, force_full_load=True)
        return self.reward.score(images, prompts)


def load_comfy_reward_model(kind: str, folder: str, head: str | None) -> ComfyRewardModel:
    dtype = torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    return ComfyRewardModel(load_reward_model(kind, folder, head, dtype=dtype))


# -- one search -----------------------------------------------------------------------------
@dataclass
class Evaluation:
    lam: float
    scores: list[float]
    watch: list[float] | None = None


@dataclass
class SearchResult:
    search: LambdaSearch
    evaluations: list[Evaluation] = field(default_factory=list)
    best_lambda: float = 0.0
    best_mean: float = 0.0


def run_search(search: LambdaSearch, evaluate: Callable[[list[float]], list[Evaluation]],
               on_round: Callable[[int, int], None] | None = None) -> SearchResult:
    """Ask, evaluate (one batched pass per round), tell; until the budget is spent."""
    result = SearchResult(search)
    while batch := search.ask():
        mm.throw_exception_if_processing_interrupted()
        done = evaluate(batch)
        search.tell([e.lam for e in done], [e.scores for e in done])
        result.evaluations.extend(done)
        if on_round is not None:
            on_round(len(search.xs), search.budget)
        log.info("DeRaDiff λ Search: %s", ", ".join(f"λ={e.lam:.3g} → {sum(e.scores) / len(e.scores):.4g}" for e in done))
    result.best_lambda, result.best_mean = search.best()
    return result


def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs: frames into the batch, as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images


@dataclass
class ImageSearchSetup:
    """What one round of the image search needs: the pair and sampler settings, the prompts (encoded),
    the seeds as a latent batch, the VAE and the reward models."""
    pair: object
    prompts: list[str]
    positives: list
    negative: list
    latent: dict
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    vae: object
    reward: ComfyRewardModel
    watch: ComfyRewardModel | None = None
    max_per_pass: int = 0
    budget: int = 0  # λ evaluations in all: sizes the one progress bar
    particles: int = 1  # > 1: every λ sampled by the particle mode (one λ per run, N particles per image)
    resample_below: float = 0.5
    node: str = "DeRaDiff λ Search"
    particle_options: dict = field(default_factory=dict)  # particle_ksampler's rule options (select_below, ...)
    ess: dict = field(default_factory=dict)  # λ -> the particle runs' ESS summaries
    latents: dict = field(default_factory=dict)  # λ -> sampled latents, prompt-major
    _done: int = 0  # progress units (one per λ, prompt and step) finished
    _progress: object = None

    def _callback(self, lams_in_sweep: int):
        """One bar over the whole search: this sweep covers lams_in_sweep x steps units of it."""
        import latent_preview
        if self._progress is None:
            total = max(1, self.budget) * len(self.prompts) * self.steps
            self._progress = (latent_preview.prepare_callback(self.pair.reference, total), total)
        update, total = self._progress
        base, span = self._done, lams_in_sweep * self.steps
        self._done += span

        def callback(step, x0, x, sweep_total):
            update(min(total, base + (step + 1) * span // max(1, sweep_total)) - 1, x0, x, total)
        return callback

    def _sample(self, lams: list[float], positive, progress: bool = True) -> torch.Tensor:
        """Every λ of ``lams`` for one prompt, λ-major: one batched sweep, or with particles one
        particle run per λ (the weights need one λ per run)."""
        if self.particles <= 1:
            return lambda_sweep(self.pair, lams, self.seed, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                positive, self.negative, self.latent, 1.0, self.max_per_pass,
                                callback=self._callback(len(lams)) if progress else None)["samples"]
        from .particle_sampler import particle_ksampler
        parts = []
        for lam in lams:
            out, state = particle_ksampler(self.pair, lam, self.seed, self.steps, self.cfg, self.sampler_name,
                                           self.scheduler, positive, self.negative, self.latent, 1.0, self.particles,
                                           self.resample_below, self.node, **self.particle_options,
                                           callback=self._callback(1) if progress else (lambda *a: None))
            self.ess.setdefault(lam, []).append(state.summary())
            parts.append(out["samples"])
        return torch.cat(parts)

    def evaluate(self, lams: list[float]) -> list[Evaluation]:
        seeds = self.latent["samples"].shape[0]
        per_lambda = {lam: ([], [] if self.watch else None, []) for lam in lams}
        for prompt, positive in zip(self.prompts, self.positives):
            out = self._sample(lams, positive)
            images = decode(self.vae, out)
            texts = [prompt] * images.shape[0]
            scores = self.reward.score(images, texts).tolist()
            watch = self.watch.score(images, texts).tolist() if self.watch else None
            for i, lam in enumerate(lams):
                part = slice(i * seeds, (i + 1) * seeds)
                per_lambda[lam][0].extend(scores[part])
                if watch is not None:
                    per_lambda[lam][1].extend(watch[part])
                per_lambda[lam][2].append(out[part].cpu())
        for lam, (_, _, samples) in per_lambda.items():
            self.latents[lam] = torch.cat(samples)
        return [Evaluation(lam, s, w) for lam, (s, w, _) in per_lambda.items()]

    def images_at(self, lam: float) -> torch.Tensor:
        """Every prompt × seed at λ (sampled again unless λ was evaluated)."""
        samples = self.latents.get(lam)
        if samples is None:
            parts = [self._sample([lam], positive, progress=False) for positive in self.positives]
            samples = torch.cat([p.cpu() for p in parts])
        return decode(self.vae, samples)


