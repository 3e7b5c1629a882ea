"""Reading a UNet's cross-attention maps through diffusers attention processors.

StableKeypoints (Hedlin et al., seed 002, Fig. 2: "we pass a randomly
initialized text embedding into Stable Diffusion and extract the attention
maps") needs, for every learned token, the map of how strongly each image
location attends to it. Those are the softmax probabilities of the
cross-attention layers (``attn2`` of every transformer block), softmax over
the *tokens*, so tokens compete for locations.

They are read with :class:`CaptureCrossAttention`, an attention processor
installed with ``unet.set_attn_processor({...})`` (diffusers' public API) and
removed afterwards -- never by replacing a module's ``forward`` (the original
code's monkey-patching broke with diffusers upgrades). The processor computes
exactly what diffusers' default ``AttnProcessor`` computes (same projections,
``attn.get_attention_scores``, output projection), and keeps the head-averaged
probabilities of the tokens it is asked for.

Layers: the cross-attention layers of the up blocks whose maps are at most
``max_side`` cells wide (method brief: "up-block layers at <= 32x32,
upsampled"). The UNet is stopped as soon as the last of them has run: the
finer up blocks after it cost most of the compute and are not read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError


class _StopUNet(Exception):
    """Raised by the processor once every wanted layer has been read (the rest of the UNet is skipped)."""


@dataclass
class AttentionStore:
    """What the processors fill: layer name -> (B, n_keep, h, w) head-averaged maps of the kept tokens."""

    wanted: tuple[str, ...]
    keep: torch.Tensor | None = None  # token indices to keep (after the softmax over all tokens); None = all
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.maps = {}


class CaptureCrossAttention:
    """A diffusers attention processor (the ``AttnProcessor`` call signature) that also records the maps.

    The attention output is computed exactly as diffusers' default processor
    does, so the UNet's behaviour is unchanged; in addition the probabilities
    (B * heads, HW, N) are averaged over heads, the columns ``store.keep`` are
    kept (the softmax still runs over all N tokens) and stored as
    (B, n_keep, h, w). Keeping only a chunk of the tokens is what bounds the
    memory of the stored maps and of their autograd graph.
    """

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, HW, N), softmax over tokens
        self._record(probs, attn.heads, hidden_states.shape[0], hidden_states.shape[1])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        if set(self.store.wanted) <= set(self.store.maps):
            raise _StopUNet()
        return out

    def _record(self, probs: torch.Tensor, heads: int, batch: int, hw: int) -> None:
        side = int(round(hw ** 0.5))
        if side * side != hw:
            raise ConfigError(f"attention layer {self.name} has {hw} query positions, not a square map",
                              where="StableKeypoints", fix="use square crops (--size)")
        maps = probs.reshape(batch, heads, hw, probs.shape[-1]).mean(dim=1)  # (B, HW, N)
        if self.store.keep is not None:
            maps = maps.index_select(-1, self.store.keep.to(maps.device))
        self.store.maps[self.name] = maps.transpose(1, 2).reshape(batch, -1, side, side)


def cross_attention_layers(unet: torch.nn.Module, latent_side: int, max_side: int = 32) -> list[str]:
    """Processor names of the up-block cross-attention layers whose maps are <= ``max_side`` cells.

    Up block ``i`` of ``n`` runs at ``latent_side / 2**(n - 1 - i)`` (every up
    block but the last ends with an upsampler). Returned in forward order.
    """
    n = len(unet.up_blocks)
    names = []
    for name in unet.attn_processors:
        parts = name.split(".")
        if parts[0] != "up_blocks" or ".attn2." not in f".{name}.":
            continue
        side = latent_side // 2 ** (n - 1 - int(parts[1]))
        if side <= max_side:
            names.append(name)
    if not names:
        raise ConfigError(f"the UNet has no up-block cross-attention layer at <= {max_side} x {max_side} for {latent_side} px latents",
                          where="StableKeypoints layers", fix="use a text-conditioned UNet (CrossAttnUpBlock2D up blocks) or raise max_side")
    return names


@contextlib.contextmanager
def capture_cross_attention(unet: torch.nn.Module, layers: Sequence[str]) -> Iterator[AttentionStore]:
    """Install :class:`CaptureCrossAttention` on ``layers`` (names from ``unet.attn_processors``); restore on exit."""
    original = dict(unet.attn_processors)
    unknown = [n for n in layers if n not in original]
    if unknown:
        raise ConfigError(f"unknown attention layers {unknown}", where="capture_cross_attention", fix="take names from unet.attn_processors")
    store = AttentionStore(tuple(layers))
    unet.set_attn_processor({n: (CaptureCrossAttention(store, n) if n in store.wanted else p) for n, p in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))


def run_unet(unet: torch.nn.Module, store: AttentionStore, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run ``unet`` until every wanted layer is recorded; return the maps (store cleared first)."""
    store.clear()
    try:
        unet(*args, **kwargs)
    except _StopUNet:
        pass
    missing = [n for n in store.wanted if n not in store.maps]
    if missing:
        raise ConfigError(f"attention layers {missing} did not run", where="run_unet", fix="check the layer names")
    return dict(store.maps)


def aggregate_maps(maps: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Average the layers' maps after bilinear upsampling to ``size`` x ``size`` (B, n, size, size)."""
    ups = [F.interpolate(m.float(), size=(size, size), mode="bilinear", align_corners=False) if m.shape[-1] != size else m.float()
           for m in maps.values()]
    return torch.stack(ups).mean(dim=0)
