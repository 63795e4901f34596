"""A Vision Transformer small enough to read, as MAE's encoder (He et al. 2021) uses it.

- Patches: a stride-p convolution embeds each p x p patch (the same as a linear layer on the
  flattened patch); 32 x 32 CIFAR images with p = 4 give an 8 x 8 grid of L = 64 tokens.
- Fixed 2-D sin-cos position embeddings (facebookresearch/mae util/pos_embed.py: the first half
  of the channels encodes the column, the second half the row; the class token's is zero) and
  a learned class token.
- Pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, GELU MLP of ratio 4) with attention by
  `F.scaled_dot_product_attention`; parameter names follow timm's, so timm/MAE weights map 1:1.
- `forward_tokens(x, ids_keep)` runs the blocks on the kept tokens only (MAE's encoder never
  sees a masked patch); `forward(x)` returns pooled features [B, D] for k-NN / linear probes:
  the class token or the mean of the patch tokens (`pool`), both after the final norm.
- `blocks` is a ModuleList and `layer_id` numbers every parameter's depth, so layer-wise lr
  decay for fine-tuning is one loop over `named_parameters()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (embed dim, depth, heads) of the encoder and (dim, depth, heads) of MAE's default
# decoder. tiny/small/base are DeiT's / ViT's sizes; the decoder is narrower and shallower
# (MAE: < 10% of the encoder's compute per token; ViT-B's is the official 512-d, 8 blocks).
# pico (tests) and nano (the CPU preset) have 1-block decoders: at CPU budgets, measured on
# CIFAR-10, smaller models taking more steps reconstruct and k-NN-classify better.
VIT_SIZES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "vit_pico": ((64, 2, 2), (48, 1, 2)),
    "vit_nano": ((96, 4, 3), (64, 1, 2)),
    "vit_tiny": ((192, 12, 3), (128, 4, 4)),
    "vit_small": ((384, 12, 6), (256, 4, 8)),
    "vit_base": ((768, 12, 12), (512, 8, 16)),
}


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embeddings [grid*grid (+1), dim], rows in raster order (MAE's).

    Each half of the channels embeds one coordinate with dim/4 frequencies 1/10000^(k/(dim/4)):
    [sin(x w), cos(x w), sin(y w), cos(y w)]. The class token's row (first) is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for pos in (x, y):  # column first, as MAE's meshgrid(grid_w, grid_h)
        out = pos.reshape(-1, 1).double() * omega  # [L, dim/4]
        parts += [out.sin(), out.cos()]
    emb = torch.cat(parts, 1)  # [L, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches in raster order, pixels (row, col, channel) inside,
    as MAE's einsum 'nchpwq->nhwpqc'."""
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid (the inverse of `patchify`)."""
    B, L, _ = x.shape
    g = int(round(L**0.5))
    if g * g != L:
        raise ValueError(f"{L} patches do not form a square grid")
    x = x.reshape(B, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, g * p, g * p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, C/heads]
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and the patch projection, seen as a linear
    layer), zero biases, unit LayerNorms, N(0, 0.02) tokens. Call on a whole model."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("token"):
            nn.init.normal_(p, std=0.02)


class VisionTransformer(nn.Module):
    """ViT encoder with a class token; forward(x) -> pooled features [B, feat_dim]."""

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        pool: str = "mean",
        in_chans: int = 3,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.patch_size, self.grid, self.pool = patch_size, img_size // patch_size, pool
        self.num_patches = self.grid**2
        self.feat_dim = dim
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # A buffer, not a parameter: fixed, but saved with the weights and moved with .to().
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid)[None])  # [1, 1+L, D]
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)

    def _pos(self, grid: int) -> torch.Tensor:
        """[1, 1+grid^2, D]; another input size gets the sin-cos table of its own grid."""
        if grid == self.grid:
            return self.pos_embed
        return sincos_pos_embed(self.feat_dim, grid)[None].to(self.pos_embed)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> patch tokens with position embeddings [B, L, D]."""
        t = self.patch_embed(x)  # [B, D, H/p, W/p]
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"square images only, got {tuple(x.shape[-2:])}")
        return t.flatten(2).transpose(1, 2) + self._pos(t.shape[-1])[:, 1:]

    def forward_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens [B, 1 + n, D]: the class token, then the n patches in `ids_keep`
        ([B, n] indices into the raster order; default all L). The blocks see no other patch."""
        t = self.embed(x)  # [B, L, D]
        if ids_keep is not None:
            t = t.gather(1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))  # [B, n, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(t), -1, -1)
        t = torch.cat([cls, t], 1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_tokens(x)
        return t[:, 0] if self.pool == "cls" else t[:, 1:].mean(1)  # [B, D]

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 for the embeddings, i + 1 for block
        i, depth + 1 for the final norm (BEiT / MAE fine-tuning's numbering)."""
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def vit_from_config(cfg: dict) -> VisionTransformer:
    """The encoder a checkpoint's config describes: cfg["backbone"] (a VIT_SIZES name),
    "patch_size", "pool", and the training crop ("crop_size", else "image_size")."""
    name = cfg["backbone"]
    if name not in VIT_SIZES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[name][0]
    return VisionTransformer(
        img_size=cfg.get("crop_size") or cfg["image_size"],
        patch_size=cfg.get("patch_size", 4),
        dim=dim,
        depth=depth,
        heads=heads,
        pool=cfg.get("pool", "mean"),
        in_chans=cfg.get("in_chans", 3),
    )
