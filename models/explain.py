"""Grad-CAM for both backbones, for any class of any head; used offline (evaluation) and by serving.

- CNN: classic Grad-CAM on the last convolutional stage (timm's ``forward_features`` output, e.g. 7x7 for
  EfficientNet-B0 at 224 px). Where that map is coarser than ``MIN_GRID`` cells a side (the 64 px demo models:
  2x2), the deepest stage that still has ``MIN_GRID`` cells is used instead, so a map can point at a lung zone.
- ViT: Grad-CAM on the patch tokens at the input of the last block (its ``norm1`` output), reshaped to the patch
  grid. Gradients rather than attention rollout because rollout is class-agnostic: it cannot say which region
  drives *Cardiomegaly* as opposed to *Effusion*. The last block's input (not its output) because with a class
  token the output's patch tokens no longer reach the head; the input's do, through the last attention.
- Backbones that name their own map layer (``backbone.cam_layer``: the hybrid CNN + Transformer of
  ``models/hybrid.py``, its projected CNN map) get Grad-CAM there.

``attention_map`` is the second method, for backbones that have ``class_token_attention`` (the hybrid): the last
encoder layer's attention from the class token to the grid tokens, heads averaged. It is the same for every label
(only the reported probability is the target's); ``explain`` picks a method by name, ``methods_for`` lists a
model's.

The score is the target's logit (before sigmoid/softmax), as in the Grad-CAM paper; the reported probability is the
target's under the head's label space (``LabelSpace.probabilities``: sigmoid or softmax). Maps are ReLU'd and scaled
to [0, 1] per image; an all-zero map means no region raised the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.labels import LabelSpace
from models.network import CxrNet

MIN_GRID = 7  # the 7x7 map Grad-CAM has on EfficientNet-B0 at 224 px: coarser cannot separate lung zones
FINAL_STAGE = "forward_features"


@dataclass(frozen=True)
class Explanation:
    cam: np.ndarray  # float32 [h, w] in [0, 1] at the layer's grid
    probability: float  # of the target under this model (its head's sigmoid or softmax)
    layer: str
    kind: str = "grad-cam"  # or "attention"

    @property
    def method(self) -> str:
        return f"{self.kind} on {self.layer} ({self.cam.shape[0]}x{self.cam.shape[1]})"


def is_vit(model: CxrNet) -> bool:
    return hasattr(model.backbone, "blocks") and hasattr(model.backbone, "patch_embed")


def cnn_layer(model: CxrNet) -> str:
    """The last convolutional stage, or the deepest one with at least ``MIN_GRID`` cells at the input size."""
    reductions = [(info["module"], info["reduction"]) for info in model.backbone.feature_info]
    if model.input_size // reductions[-1][1] >= MIN_GRID:
        return FINAL_STAGE
    for module, reduction in reversed(reductions):
        if model.input_size // reduction >= MIN_GRID:
            return module
    return reductions[0][0]


def _activations_and_logits(model: CxrNet, images: torch.Tensor) -> tuple[torch.Tensor, dict, str]:
    """(activations [B, C, h, w] with grad, logits per head, layer name) in one forward pass."""
    captured: dict[str, torch.Tensor] = {}
    if getattr(model.backbone, "cam_layer", None):
        layer = model.backbone.cam_layer
    elif is_vit(model):
        layer = f"blocks.{len(model.backbone.blocks) - 1}.norm1"
    else:
        layer = cnn_layer(model)
    hook = None
    if layer != FINAL_STAGE:
        module = model.backbone.get_submodule(layer)
        hook = module.register_forward_hook(lambda _module, _inputs, output: captured.setdefault("a", output))
    try:
        features = model.backbone.forward_features(model.normalize(images))
    finally:
        if hook is not None:
            hook.remove()
    activations = captured.get("a", features)
    pooled = model.backbone.forward_head(features, pre_logits=True)
    logits = model.classify(pooled)  # the heads (with a fusion model's "metadata missing" embedding)
    return activations, logits, f"backbone.{layer}"


def _as_grid(model: CxrNet, tensor: torch.Tensor) -> torch.Tensor:
    """ViT tokens [B, prefix + h*w, D] -> [B, D, h, w] (prefix tokens dropped); CNN maps pass through."""
    if not is_vit(model):
        return tensor
    grid_h, grid_w = model.backbone.patch_embed.grid_size
    tokens = tensor[:, model.backbone.num_prefix_tokens :]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)


def head_space(model: CxrNet, head: str, target: int | None = None) -> LabelSpace:
    """The label space of one of the model's heads; a head it does not have (or a target outside the head's
    classes) is a ``ValueError`` naming the ones it has."""
    spaces = {space.head: space for space in model.label_spaces}
    if head not in spaces:
        raise ValueError(f"head must be one of {', '.join(spaces)}, got {head!r}")
    classes = spaces[head].classes
    if target is not None and not 0 <= target < len(classes):
        raise ValueError(f"target {target} is not a class index of head {head!r} ({len(classes)} classes)")
    return spaces[head]


def grad_cam(model: CxrNet, images: np.ndarray | torch.Tensor, head: str, target: int) -> list[Explanation]:
    """Grad-CAM of ``target`` (an index into ``head``'s label space) for uint8 images [B, 1, S, S]."""
    space = head_space(model, head, target)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = torch.tensor(np.asarray(images)).to(device)  # a copy: decoded arrays may be read-only
    try:
        with torch.enable_grad():
            activations, logits, layer = _activations_and_logits(model, batch)
            scores = logits[head][:, target]
            (gradients,) = torch.autograd.grad(scores.sum(), activations)  # samples are independent in eval mode
        activations, gradients = _as_grid(model, activations.detach()), _as_grid(model, gradients)
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cams = F.relu((weights * activations).sum(dim=1))
        peak = cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        cams = (cams / peak).float().cpu().numpy()
        probs = space.probabilities(logits[head])
        target_probs = probs[:, target].detach().float().cpu().numpy()
    finally:
        model.train(was_training)
    return [Explanation(cam, float(p), layer) for cam, p in zip(cams, target_probs, strict=True)]


GRAD_CAM, ATTENTION = "grad-cam", "attention"
METHODS = (GRAD_CAM, ATTENTION)


def has_attention(model: CxrNet) -> bool:
    return callable(getattr(model.backbone, "class_token_attention", None))


def methods_for(model: CxrNet) -> tuple[str, ...]:
    """The explanation methods ``model`` supports: Grad-CAM always, attention where the backbone has it."""
    return METHODS if has_attention(model) else (GRAD_CAM,)


def attention_map(model: CxrNet, images: np.ndarray | torch.Tensor, head: str, target: int) -> list[Explanation]:
    """The class token's last-layer attention to the grid tokens (heads averaged) for uint8 images [B, 1, S, S],
    scaled to a peak of 1 like Grad-CAM; ``probability`` is ``target``'s under the model."""
    if not has_attention(model):
        raise ValueError(f"{model.arch} has no class-token attention to explain with; use {GRAD_CAM}")
    space = head_space(model, head, target)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = torch.tensor(np.asarray(images)).to(device)
    try:
        with torch.inference_mode():
            normalized = model.normalize(batch)
            attention = model.backbone.class_token_attention(normalized)
            pooled = model.backbone.forward_head(model.backbone.forward_features(normalized), pre_logits=True)
            logits = model.classify(pooled)[head]
            probs = space.probabilities(logits)
    finally:
        model.train(was_training)
    peak = attention.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    maps = (attention / peak).float().cpu().numpy()
    layer = f"backbone.{getattr(model.backbone, 'attention_layer', 'class_token_attention')}"
    return [
        Explanation(cam, float(p), layer, kind=ATTENTION)
        for cam, p in zip(maps, probs[:, target].float().cpu().numpy(), strict=True)
    ]


def explain(
    model: CxrNet, images: np.ndarray | torch.Tensor, head: str, target: int, method: str = GRAD_CAM
) -> list[Explanation]:
    """``grad_cam`` or ``attention_map`` by name; a method the model does not have is a ``ValueError``."""
    if method not in methods_for(model):
        raise ValueError(f"{model.arch} explains with {', '.join(methods_for(model))}, not {method!r}")
    return attention_map(model, images, head, target) if method == ATTENTION else grad_cam(model, images, head, target)


def upsample(cam: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A map resized (bilinear) to ``size`` pixels, kept in [0, 1]."""
    shape = (size, size) if isinstance(size, int) else size
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def fuse_maps(cnn: np.ndarray, vit: np.ndarray, w_cnn: float) -> np.ndarray:
    """The ensemble's map: the two maps on the finer grid, weighted like the probabilities, rescaled to [0, 1]."""
    shape = max(cnn.shape, vit.shape)
    fused = w_cnn * upsample(cnn, shape) + (1.0 - w_cnn) * upsample(vit, shape)
    return fused / max(float(fused.max()), 1e-12)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45, colormap: str = "inferno") -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grayscale image with the map (upsampled to it) blended on top."""
    from matplotlib import colormaps  # not pyplot: no backend needed

    heat = upsample(cam, gray.shape[:2])
    colours = colormaps[colormap](heat)[..., :3]
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    # the map's weight follows its value, so cold regions show the radiograph undimmed
    weight = alpha * heat[..., None]
    return np.clip(255.0 * ((1.0 - weight) * base + weight * colours), 0, 255).astype(np.uint8)


def mass_over(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass (upsampled to the mask) that lies inside ``mask``."""
    heat = upsample(cam, mask.shape)
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0
