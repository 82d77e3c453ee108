"""A small ViT for 32x32 images (SPEC §4, practical setting), and its scale-invariant variant.

Shifted-patch tokenization (SPT) and locality self-attention (LSA) follow Lee et al. 2021,
"Vision Transformer for Small-Size Datasets". Defaults: patch 4, dim 512, depth 6, 8 heads of
size 64, MLP dim 512, dropout 0.1: about 9.6 M parameters for 10 classes. Through the registry,
dim and depth are ModelConfig.width and .depth; the other sizes are `ViTOptions`, set in
ModelConfig.options (e.g. [model.options] heads = 4).

"vit" is an ordinary network: every parameter is trained without constraint and
`si_parameters()` is empty.

"vit-si" puts a LayerNorm without affine parameters after each feed-forward linear and drops
those linears' biases, so each feed-forward weight (2 per block) is scale-invariant on its own
and all of them together form the SI group `si_parameters()` returns. Everything else stays an
ordinary trainable parameter: the tokenizer (LayerNorm + Linear), the CLS token, the position
embedding, every pre-norm LayerNorm, the attention projections (qkv, out) and the log-temperature,
and the head (LayerNorm + Linear, not frozen).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .registry import register_model


@dataclass(frozen=True)
class ViTOptions:
    """ViT sizes besides model.width (= dim) and model.depth; SPEC §4 values by default."""

    heads: int = 8             # attention heads per block
    dim_head: int = 64         # size of each head (q, k, v)
    mlp_dim: int = 512         # hidden width of the feed-forward block
    patch: int = 4             # patch side in pixels; SPT shifts by half of it
    dropout: float = 0.1       # in attention and feed-forward blocks
    emb_dropout: float = 0.1   # on the token embeddings, before the first block

    def __post_init__(self) -> None:
        """Reject values no ViT can take, naming the config field (model.options.<field>)."""
        for name in ("heads", "dim_head", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.options.{name}={getattr(self, name)!r} must be >= 1")
        # SPT shifts by patch // 2 pixels, which must be at least one.
        if self.patch < 2:
            raise ConfigError(f"model.options.patch={self.patch!r} must be >= 2, e.g. 4 for 32x32 images")
        for name in ("dropout", "emb_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.options.{name}={getattr(self, name)!r} must be in [0, 1)")


class ShiftedPatchTokenizer(nn.Module):
    """SPT: the image and its 4 diagonal half-patch shifts, patchified, LayerNorm, Linear."""

    def __init__(self, channels: int, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        patch_dim = 5 * channels * patch * patch
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 5C, H, W]: x, then copies shifted by (±p/2, ±p/2), zero-filled."""
        s = self.patch // 2
        # F.pad with a negative amount crops, so (s, -s) moves content s pixels right/down.
        copies = [F.pad(x, (dx, -dx, dy, -dy)) for dx, dy in ((s, s), (-s, s), (s, -s), (-s, -s))]
        return torch.cat([x, *copies], dim=1)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, num_patches, dim]."""
        return self.proj(self.norm(self.patchify(self.shifted(x))))


class LocalitySelfAttention(nn.Module):
    """LSA: multi-head attention with a learnable softmax temperature and no self-attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        # Stored as a log so the temperature stays positive; starts at the usual 1/sqrt(d).
        self.log_temperature = nn.Parameter(torch.tensor(math.log(dim_head ** -0.5)))
        self.to_out = nn.Linear(inner, dim)
        self.out_drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, dim_head]
        return q * self.log_temperature.exp(), k, v

    @staticmethod
    def _allowed(n: int, device: torch.device) -> torch.Tensor:
        """Boolean [N, N] mask, False on the diagonal: a token never attends to itself."""
        return ~torch.eye(n, dtype=torch.bool, device=device)

    def _softmax(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)).masked_fill(~self._allowed(q.shape[-2], q.device), float("-inf"))
        return scores.softmax(dim=-1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix [B, heads, N, N] (no dropout), for inspection."""
        q, k, _ = self._qkv(x)
        return self._softmax(q, k)

    # Set by the fused image engine: vmap has no batching rule for the fused attention kernels
    # (it would loop over the models), while the explicit product batches over them.
    explicit_attention = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, dim]."""
        q, k, v = self._qkv(x)
        if self.explicit_attention and not (self.training and self.dropout):
            out = self._softmax(q, k) @ v
        else:
            # The temperature is already in q, hence scale=1; the fused kernel applies the mask.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._allowed(x.shape[1], x.device),
                dropout_p=self.dropout if self.training else 0.0, scale=1.0)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.out_drop(self.to_out(out))


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear; the SI variant adds a LayerNorm (no affine) after each linear."""

    def __init__(self, dim: int, hidden: int, dropout: float, scale_invariant: bool,
                 norm_eps: float):
        super().__init__()
        # A bias before a normalization would break scale invariance (SPEC §2).
        self.fc1 = nn.Linear(dim, hidden, bias=not scale_invariant)
        self.fc2 = nn.Linear(hidden, dim, bias=not scale_invariant)
        if scale_invariant:
            self.norm1 = nn.LayerNorm(hidden, eps=norm_eps, elementwise_affine=False)
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        else:
            self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, dim]."""
        x = self.drop(F.gelu(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + LSA(LN(x)), then x + FF(LN(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float,
                 scale_invariant: bool, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = LocalitySelfAttention(dim, heads, dim_head, dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout, scale_invariant, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, dim]."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class ViT(nn.Module):
    """ViT with SPT + LSA, CLS-token pooling and a LayerNorm + Linear head."""

    def __init__(self, image_size: tuple[int, int], channels: int, num_outputs: int,
                 dim: int = 512, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 mlp_dim: int = 512, patch: int = 4, dropout: float = 0.1,
                 emb_dropout: float = 0.1, scale_invariant: bool = False,
                 norm_eps: float = 1e-7):
        super().__init__()
        h, w = image_size
        if patch < 2 or h % patch or w % patch:
            raise ConfigError(f"ViT patch {patch} must be >= 2 and divide the image size {h}x{w}; "
                              "pick a patch size such as 4 for 32x32 images")
        if min(dim, depth, heads, dim_head, mlp_dim, num_outputs) < 1:
            raise ConfigError("ViT dim, depth, heads, dim_head, mlp_dim and num_outputs must be >= 1; "
                              "fix model.width / model.depth in the config")
        self.scale_invariant = scale_invariant
        num_patches = (h // patch) * (w // patch)
        self.tokenizer = ShiftedPatchTokenizer(channels, patch, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.emb_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim, dropout, scale_invariant, norm_eps)
            for _ in range(depth))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.squeeze = num_outputs == 1

    def si_parameters(self) -> list[nn.Parameter]:
        """The feed-forward linear weights in the SI variant (2 per block); [] otherwise."""
        if not self.scale_invariant:
            return []
        return [w for block in self.blocks for w in (block.ff.fc1.weight, block.ff.fc2.weight)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS representation after the head LayerNorm: the input of the last linear."""
        tokens = self.tokenizer(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        z = self.emb_drop(torch.cat([cls, tokens], dim=1) + self.pos_embedding)
        for block in self.blocks:
            z = block(z)
        return self.head_norm(z[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: shape [N] for one output, [N, C] otherwise."""
        out = self.head(self.features(x))
        return out.squeeze(-1) if self.squeeze else out


def _build(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, options: ViTOptions,
           scale_invariant: bool) -> ViT:
    """The ViT of `cfg` and `options` for images of `input_shape`."""
    c, h, w = input_shape  # build_model has checked the shape is (C, H, W)
    return ViT((h, w), c, num_outputs, dim=cfg.width, depth=cfg.depth, **dataclasses.asdict(options),
               scale_invariant=scale_invariant, norm_eps=cfg.norm_eps)


@register_model("vit", input_kind="image", si_group="none", options=ViTOptions, engines=("fused", "images"),
                description="ViT (SPT + LSA), practical setting; fused only without dropout "
                            "(options.dropout = emb_dropout = 0)")
def build_vit(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, options: ViTOptions) -> ViT:
    """Regular ViT (SPT + LSA): dim = cfg.width (512 in the paper), depth = cfg.depth (6)."""
    return _build(cfg, input_shape, num_outputs, options, scale_invariant=False)


@register_model("vit-si", input_kind="image", si_group="partial", options=ViTOptions, engines=("fused", "images"),
                description="ViT with SI blocks on the sphere; fused only without dropout "
                            "(options.dropout = emb_dropout = 0)")
def build_vit_si(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, options: ViTOptions) -> ViT:
    """ViT whose feed-forward linear weights are scale-invariant (LayerNorm after each)."""
    return _build(cfg, input_shape, num_outputs, options, scale_invariant=True)
