"""Reward models that score images against prompts: PickScore, CLIP score, LAION aesthetic v2.

No ComfyUI import: files are read with transformers / safetensors / torch from local folders only
(nothing is downloaded). The node layer wraps the torch modules for ComfyUI's memory management.

  - CLIP score: 100 · cos(image embedding, text embedding) with any transformers CLIP folder.
  - PickScore: logit_scale.exp() · cos(...) with the PickScore_v1 CLIPModel (its processor is
    CLIP-ViT-H-14's: put its preprocessor and tokenizer files in the same folder or a `processor/`
    subfolder).
  - LAION aesthetic v2: a 768→1024→128→64→16→1 MLP on the L2-normalised CLIP ViT-L/14 image
    embedding (the prompt is not used).
  - torch scorer: a small torch module from a folder holding ``config.json`` (``"model_type":
    "deradiff_torch_scorer"``, ``"architecture"`` one of ``SCORER_ARCHITECTURES``) and its parameters in
    ``model.safetensors``. ``colourfulness`` (the tiny family's reward, scripts/tiny_family.py):
    scale × mean over pixels of (max(R,G,B) − min(R,G,B)); the prompt is not used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("pickscore", "clip_score", "laion_aesthetic", "torch_scorer")
SCORER_TYPE = "deradiff_torch_scorer"
MODEL_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# the aesthetic head: Linear layers at these indices of the original nn.Sequential (dropouts between)
_AESTHETIC_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


class RewardModelError(ValueError):
    """A reward-model folder or file that cannot be used; ``path`` is the file or folder at fault."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the projected embeddings; 5.x an output object holding them
    return output if torch.is_tensor(output) else output.pooler_output


def _processor_folder(folder: str) -> str:
    sub = os.path.join(folder, "processor")
    return sub if os.path.isdir(sub) else folder


def check_clip_folder(folder: str, needs_text: bool = True) -> None:
    """Raise RewardModelError naming the first missing file of a transformers CLIP folder."""
    if not os.path.isdir(folder):
        raise RewardModelError(folder, "no such folder")
    for name in MODEL_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise RewardModelError(os.path.join(folder, name), "missing (a transformers CLIP model folder needs it)")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise RewardModelError(folder, f"no weights file (one of {', '.join(WEIGHT_FILES[:2])})")
    processor = _processor_folder(folder)
    for name in PROCESSOR_FILES:
        if not os.path.isfile(os.path.join(processor, name)):
            raise RewardModelError(os.path.join(processor, name),
                                   "missing: the image processor's settings (from the model's processor repository)")
    if needs_text and not any(os.path.isfile(os.path.join(processor, n)) for n in TOKENIZER_FILES):
        raise RewardModelError(processor, f"no tokenizer files ({' or '.join(TOKENIZER_FILES)} with merges.txt)")


@dataclass
class _Clip:
    model: torch.nn.Module
    processor: object
    tokenizer: object

    @classmethod
    def load(cls, folder: str, needs_text: bool = True, dtype=torch.float32) -> "_Clip":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        check_clip_folder(folder, needs_text)
        processor_folder = _processor_folder(folder)
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).eval()
        except Exception as e:  # a truncated or foreign file: say which folder, keep the cause
            raise RewardModelError(folder, f"not a loadable transformers CLIP model ({type(e).__name__}: {e})") from e
        try:
            processor = CLIPImageProcessor.from_pretrained(processor_folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(processor_folder, local_files_only=True) if needs_text else None
        except Exception as e:
            raise RewardModelError(processor_folder, f"the processor or tokenizer files do not load ({type(e).__name__}: {e})") from e
        return cls(model, processor, tokenizer)

    def device(self):
        return next(self.model.parameters()).device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images: [N, H, W, C] in 0..1 (ComfyUI's IMAGE) -> unit-norm embeddings [N, D]."""
        pixels = np.clip(images[..., :3].detach().float().cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
        inputs = self.processor(images=list(pixels), return_tensors="pt")
        model_dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device(), model_dtype))
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        limit = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device()),
                                               attention_mask=tokens["attention_mask"].to(self.device()))
        return torch.nn.functional.normalize(_features(out).float(), dim=-1)


class RewardModel:
    """``score(images, prompts)`` -> one float per image (higher is better)."""
    kind = ""
    uses_prompt = True

    def __init__(self, name: str):
        self.name = name

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, images, prompts):
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"expected IMAGE [N, H, W, C], got shape {tuple(images.shape)}")
        if self.uses_prompt and len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")


class ClipScore(RewardModel):
    kind = "clip_score"
    scale_name = "100 · cosine"

    def __init__(self, folder: str, name: str = "", dtype=torch.float32):
        super().__init__(name or os.path.basename(folder.rstrip("/\\")))
        self.clip = _Clip.load(folder, dtype=dtype)

    def modules(self):
        return [self.clip.model]

    def _scale(self) -> float:
        return 100.0

    def score(self, images, prompts):
        self._check(images, prompts)
        cos = (self.clip.image_embeddings(images) * self.clip.text_embeddings(list(prompts))).sum(-1)
        return (self._scale() * cos).cpu()


class PickScore(ClipScore):
    kind = "pickscore"
    scale_name = "logit scale · cosine"

    def _scale(self) -> float:
        return float(self.clip.model.logit_scale.detach().exp())


def load_aesthetic_head(path: str) -> torch.nn.Sequential:
    """The LAION aesthetic v2 MLP from its .pth / .safetensors state dict."""
    if not os.path.isfile(path):
        raise RewardModelError(path, "no such file")
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardModelError(path, f"cannot be read ({type(e).__name__}: {e})") from e
    state = {k.removeprefix("model."): v for k, v in state.items()}
    missing = [f"{layer}.weight" for layer in _AESTHETIC_LAYERS if f"{layer}.weight" not in state]
    if missing:
        raise RewardModelError(path, f"not a LAION aesthetic v2 head: no {', '.join(missing)} "
                                     f"(expected the 5 Linear layers {', '.join(_AESTHETIC_LAYERS)})")
    linears = []
    for layer in _AESTHETIC_LAYERS:
        w, b = state[f"{layer}.weight"], state.get(f"{layer}.bias")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w.float())
            if b is not None:
                lin.bias.copy_(b.float())
        linears.append(lin)
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise RewardModelError(path, f"layer sizes do not chain ({a.out_features} -> {b.in_features})")
    if linears[-1].out_features != 1:
        raise RewardModelError(path, f"the last layer gives {linears[-1].out_features} values, not 1 score")
    return torch.nn.Sequential(*linears).eval()  # dropouts are identities at inference


class LaionAesthetic(RewardModel):
    kind = "laion_aesthetic"
    uses_prompt = False
    scale_name = "aesthetic (about 1–10)"

    def __init__(self, clip_folder: str, head_path: str, name: str = "", dtype=torch.float32):
        super().__init__(name or os.path.basename(head_path))
        self.clip = _Clip.load(clip_folder, needs_text=False, dtype=dtype)
        self.head = load_aesthetic_head(head_path)
        width = self.clip.model.config.projection_dim
        if self.head[0].in_features != width:
            raise RewardModelError(head_path, f"takes {self.head[0].in_features}-wide embeddings, but the CLIP model "
                                              f"in {clip_folder} gives {width} (LAION aesthetic v2 needs CLIP ViT-L/14)")

    def modules(self):
        return [self.clip.model, self.head]

    def score(self, images, prompts=()):
        self._check(images, prompts)
        emb = self.clip.image_embeddings(images)
        head = self.head
        with torch.no_grad():
            return head(emb.to(next(head.parameters()).device))[:, 0].float().cpu()


class Colourfulness(torch.nn.Module):
    """scale × mean over pixels of (max − min over R, G, B), on [N, H, W, C] images in 0..1."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([100.0]), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images[..., :3].to(self.scale.dtype)
        return self.scale * (rgb.amax(dim=-1) - rgb.amin(dim=-1)).float().mean(dim=(1, 2)).to(self.scale.dtype)


SCORER_ARCHITECTURES = {"colourfulness": Colourfulness}


class TorchScorer(RewardModel):
    kind = "torch_scorer"

    def __init__(self, folder: str, name: str = "", dtype=torch.float32):
        import json
        super().__init__(name or os.path.basename(folder.rstrip("/\\")))
        config_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
        if not os.path.isfile(config_path):
            raise RewardModelError(config_path, "missing (a torch scorer folder needs config.json and model.safetensors)")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise RewardModelError(config_path, f"cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(config, dict) or config.get("model_type") != SCORER_TYPE:
            raise RewardModelError(config_path, f"not a torch scorer (its model_type is not '{SCORER_TYPE}')")
        arch = config.get("architecture")
        if arch not in SCORER_ARCHITECTURES:
            raise RewardModelError(config_path, f"unknown architecture {arch!r} (one of {', '.join(SCORER_ARCHITECTURES)})")
        if not os.path.isfile(weights):
            raise RewardModelError(weights, "missing (the scorer's parameters)")
        import safetensors.torch
        try:
            state = safetensors.torch.load_file(weights)
        except Exception as e:
            raise RewardModelError(weights, f"cannot be read ({type(e).__name__}: {e})") from e
        self.module = SCORER_ARCHITECTURES[arch]()
        try:
            self.module.load_state_dict(state)
        except RuntimeError as e:
            raise RewardModelError(weights, f"does not fit the '{arch}' scorer ({e})") from e
        self.module.eval().to(dtype)
        self.uses_prompt = bool(config.get("uses_prompt", False))
        self.scale_name = str(config.get("description", arch))

    def modules(self):
        return [self.module]

    def score(self, images, prompts=()):
        self._check(images, prompts)
        with torch.no_grad():
            return self.module(images.to(self.module.scale.device)).float().cpu()


def load_reward_model(kind: str, folder: str, head_path: str | None = None, dtype=torch.float32) -> RewardModel:
    if kind == "clip_score":
        return ClipScore(folder, dtype=dtype)
    if kind == "pickscore":
        return PickScore(folder, dtype=dtype)
    if kind == "laion_aesthetic":
        if not head_path:
            raise RewardModelError(folder, "LAION aesthetic needs its MLP head file as well as the CLIP ViT-L/14 folder")
        return LaionAesthetic(folder, head_path, dtype=dtype)
    if kind == "torch_scorer":
        return TorchScorer(folder, dtype=dtype)
    raise ValueError(f"unknown reward model kind '{kind}' (one of {', '.join(KINDS)})")
