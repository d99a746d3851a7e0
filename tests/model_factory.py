"""Small seeded Real-ESRGAN networks written in the official key layout.

The tensors are built by shape here, independently of spandrel's classes, so that a test which loads
them through esrfarm checks that the official layout is recognised, not that spandrel agrees with
itself. Weights are small (std 0.05 around a scaled identity-free init) so activations stay bounded.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _conv(gen: torch.Generator, out_ch: int, in_ch: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * std
    bias = torch.randn(out_ch, generator=gen) * 0.01
    return weight, bias


def compact_state_dict(
    *, scale: int = 4, num_feat: int = 8, num_conv: int = 2, seed: int = 0, in_ch: int = 3
) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact (realesr-animevideov3 / realesr-general-x4v3 layout)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    w, b = _conv(gen, num_feat, in_ch, 0.1)
    sd["body.0.weight"], sd["body.0.bias"] = w, b
    sd["body.1.weight"] = torch.full((num_feat,), 0.25)
    for i in range(1, num_conv + 1):
        w, b = _conv(gen, num_feat, num_feat, 0.05)
        sd[f"body.{2 * i}.weight"], sd[f"body.{2 * i}.bias"] = w, b
        sd[f"body.{2 * i + 1}.weight"] = torch.rand(num_feat, generator=gen) * 0.3
    last = 2 * (num_conv + 1)
    w, b = _conv(gen, in_ch * scale * scale, num_feat, 0.05)
    sd[f"body.{last}.weight"], sd[f"body.{last}.bias"] = w, b
    return sd


def rrdb_state_dict(
    *, scale: int = 4, num_feat: int = 8, num_grow_ch: int = 32, num_block: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """RRDBNet (RealESRGAN_x4plus / x2plus / anime_6B / RealESRNet layout).

    spandrel takes the growth channels to be 32, as in every official release.
    Scale 2 and 1 use pixel-unshuffle in the official code, so conv_first takes 12 or 48 channels.
    """
    gen = torch.Generator().manual_seed(seed)
    in_ch = {1: 48, 2: 12, 4: 3}[scale]
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, out_ch: int, in_c: int, std: float = 0.05) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _conv(gen, out_ch, in_c, std)

    put("conv_first", num_feat, in_ch, 0.1)
    for b in range(num_block):
        for r in (1, 2, 3):
            for c in range(1, 5):
                put(f"body.{b}.rdb{r}.conv{c}", num_grow_ch, num_feat + (c - 1) * num_grow_ch)
            put(f"body.{b}.rdb{r}.conv5", num_feat, num_feat + 4 * num_grow_ch)
    put("conv_body", num_feat, num_feat)
    put("conv_up1", num_feat, num_feat)
    put("conv_up2", num_feat, num_feat)
    put("conv_hr", num_feat, num_feat)
    put("conv_last", 3, num_feat)
    return sd


def write_official(path: Path, state_dict: dict[str, torch.Tensor], key: str = "params_ema") -> Path:
    """Write a state dict the way the official releases do: wrapped in `params_ema` or `params`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: state_dict}, path)
    return path


def write_tiny_compact(path: Path, *, scale: int = 4, seed: int = 0, key: str = "params") -> Path:
    """The tiny model the worker and coordinator tests run: 8 features, 2 body convs."""
    return write_official(path, compact_state_dict(scale=scale, seed=seed), key=key)
