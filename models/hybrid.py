"""A hybrid CNN + Transformer backbone, registered with timm so it serves in either ensemble role by name.

A CNN turns the image into a feature map (DenseNet-121: 1024 x 7 x 7 at 224 px; the tiny test CNN: 64 x 8 x 8 at
64 px); a 1x1 convolution projects each cell to a token; a learned class token and position embeddings (resized
bicubically when the grid differs from the one they were made for) go in front; a few pre-norm Transformer encoder
layers (``torch.nn``) mix them; the class token's output is the feature vector our heads read (``num_features``).

The class token's attention to the grid tokens in the last layer (heads averaged) is the model's own answer to
"where did it look"; ``class_token_attention`` returns it and ``models.explain`` serves it next to Grad-CAM.

Registered names (``timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, drop_rate=...)``):
``cxr_hybrid_densenet121`` and ``cxr_hybrid_tiny`` (a few conv layers; tests and the demo). Importing
``models.network`` imports this module, so the names exist wherever a model is built.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CxrHybrid", "cxr_hybrid_densenet121", "cxr_hybrid_tiny"]


def _tiny_cnn(in_chans: int, widths: tuple[int, ...] = (16, 32, 64)) -> tuple[nn.Module, int, int]:
    """A few strided 3x3 conv + BN + ReLU layers: (module, channels, reduction)."""
    layers: list[nn.Module] = []
    channels = in_chans
    for width in widths:
        layers.append(
            nn.Sequential(
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        )
        channels = width
    return nn.Sequential(*layers), channels, 2 ** len(widths)


def _densenet121_cnn(in_chans: int) -> tuple[nn.Module, int, int]:
    """timm's DenseNet-121 ``features`` (ending in norm5 + ReLU): (module, 1024, 32)."""
    densenet = timm.create_model("densenet121", pretrained=False, num_classes=0, in_chans=in_chans)
    return densenet.features, densenet.num_features, 32


CNNS = {"tiny": _tiny_cnn, "densenet121": _densenet121_cnn}


class CxrHybrid(nn.Module):
    """``forward(x [B, C, H, W]) -> [B, num_classes]`` (or features ``[B, embed_dim]`` when ``num_classes=0``)."""

    def __init__(
        self,
        cnn: str = "tiny",
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        base_grid: int = 8,
        in_chans: int = 1,
        num_classes: int = 0,
        drop_rate: float = 0.0,
        encoder_drop_rate: float = 0.0,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        if cnn not in CNNS:
            raise ValueError(f"cnn must be one of {', '.join(CNNS)}, got {cnn!r}")
        if global_pool != "token":
            raise ValueError(f"global_pool must be 'token' (the class token's output), got {global_pool!r}")
        self.cnn, cnn_channels, reduction = CNNS[cnn](in_chans)
        self.proj = nn.Conv2d(cnn_channels, embed_dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + base_grid * base_grid, embed_dim))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                embed_dim,
                num_heads,
                dim_feedforward=int(embed_dim * mlp_ratio),
                dropout=encoder_drop_rate,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes, self.num_features, self.embed_dim = num_classes, embed_dim, embed_dim
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.base_grid, self.reduction = base_grid, reduction
        self.global_pool = global_pool
        # Grad-CAM's layer (models.explain): the projected CNN map [B, D, h, w], whose cells are the tokens
        self.cam_layer = "proj"
        self.attention_layer = f"encoder.{depth - 1}.self_attn"  # whose weights class_token_attention returns
        self.feature_info = [{"num_chs": embed_dim, "reduction": reduction, "module": "proj"}]
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + h*w, D]: the class token's embedding and the grid's, resized from ``base_grid`` when needed."""
        if grid == (self.base_grid, self.base_grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, self.base_grid, self.base_grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The encoder's input [B, 1 + h*w, D] (class token first) and the grid (h, w)."""
        grid_map = self.proj(self.cnn(x))
        grid = (int(grid_map.shape[2]), int(grid_map.shape[3]))
        tokens = grid_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self._position_embedding(grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.tokens(x)
        for layer in self.encoder:
            tokens = layer(tokens)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def class_token_attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, w]: the last layer's attention from the class token to each grid token, averaged over heads and
        renormalised over the grid (the class token's attention to itself left out), so each map sums to 1."""
        tokens, grid = self.tokens(x)
        for layer in self.encoder[:-1]:
            tokens = layer(tokens)
        last = self.encoder[-1]
        normed = last.norm1(tokens)  # pre-norm: the attention sees the normalised tokens
        _, weights = last.self_attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
        to_grid = weights[:, 0, 1:]
        to_grid = to_grid / to_grid.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return to_grid.reshape(-1, *grid)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "token":
            raise ValueError(f"global_pool must be 'token', got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()


def _cfg(input_size: int, first_conv: str) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (1, input_size, input_size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": (0.5,),
        "std": (0.25,),
        "first_conv": first_conv,
        "classifier": "head",
    }


default_cfgs = generate_default_cfgs(
    {
        "cxr_hybrid_densenet121": _cfg(224, "cnn.conv0"),
        "cxr_hybrid_tiny": _cfg(64, "cnn.0.0"),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> CxrHybrid:
    if pretrained:
        raise ValueError(f"{variant} has no downloadable weights: give a local file (model.<role>.pretrained)")
    return build_model_with_cfg(CxrHybrid, variant, pretrained=False, **kwargs)


@register_model
def cxr_hybrid_densenet121(pretrained: bool = False, **kwargs) -> CxrHybrid:
    """DenseNet-121 (7x7 map at 224 px) -> 384-d tokens -> 4 encoder layers of 6 heads."""
    args = {"cnn": "densenet121", "embed_dim": 384, "depth": 4, "num_heads": 6, "mlp_ratio": 4.0, "base_grid": 7}
    return _create("cxr_hybrid_densenet121", pretrained, **{**args, **kwargs})


@register_model
def cxr_hybrid_tiny(pretrained: bool = False, **kwargs) -> CxrHybrid:
    """Three conv layers (8x8 map at 64 px) -> 32-d tokens -> 2 encoder layers of 2 heads; tests and the demo."""
    args = {"cnn": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "base_grid": 8}
    return _create("cxr_hybrid_tiny", pretrained, **{**args, **kwargs})
