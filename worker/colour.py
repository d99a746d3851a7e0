"""YUV 4:2:0 <-> RGB on the worker's device, around the model (torch).

A job with YUV frames (:attr:`manifests.FrameFormat.YUV`) sends the decoder's own samples and gets
back the encoder's: the worker turns them into the RGB frames the model takes and the model's RGB
output back into YUV, on the device that runs the model, so the hosts' CPUs never convert a pixel
(on a GPU it costs a fraction of a millisecond per frame). The numbers come from the manifest's
:class:`manifests.colour.YuvSpec` (matrix, range, depth; chroma sited at the centre, as ffmpeg's
converter assumes).

The RGB in between is what an RGB job's frames hold: uint8 for an 8-bit source, full-scale uint16
above 8 bits, so the model sees the same kind of frame either way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from manifests.colour import YuvSpec, i420_shape


class RgbUpscaler(Protocol):
    """What :func:`upscale_i420` needs of an upscaler; one with ``upscale_yuv`` too converts itself."""

    def upscale(self, frames: np.ndarray, scale: float | None = None) -> np.ndarray: ...


def _matrix(rows: tuple[tuple[float, float, float], ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=like.device)


def i420_to_rgb(frames: torch.Tensor, spec: YuvSpec) -> torch.Tensor:
    """(N, H * 3 / 2, W) planar 4:2:0 samples -> (N, H, W, 3) RGB: uint8 for 8-bit samples, else
    full-scale uint16. On the frames' device, in fp32."""
    count, rows, width = frames.shape
    height = rows * 2 // 3
    flat = frames.reshape(count, -1)
    luma, chroma = height * width, height * width // 4
    y_off, y_scale = spec.luma_offset_scale
    c_off, c_scale = spec.chroma_offset_scale
    y = (flat[:, :luma].reshape(count, height, width).float() - y_off) / y_scale
    u = (flat[:, luma : luma + chroma].reshape(count, height // 2, width // 2).float() - c_off) / c_scale
    v = (flat[:, luma + chroma :].reshape(count, height // 2, width // 2).float() - c_off) / c_scale
    yuv = torch.stack((y, _upsample(u), _upsample(v)), dim=-1)  # N, H, W, 3
    rgb = (yuv @ _matrix(spec.to_rgb_matrix(), yuv).T).clamp_(0.0, 1.0)
    if spec.sample_bits == 8:
        return rgb.mul_(255.0).round_().to(torch.uint8)
    return rgb.mul_(65535.0).round_().to(torch.int32).to(torch.uint16)


def rgb_to_i420(rgb: torch.Tensor, spec: YuvSpec) -> torch.Tensor:
    """(N, H, W, 3) RGB (uint8 or full-scale uint16) -> (N, H * 3 / 2, W) planar 4:2:0 samples of
    ``spec``'s depth (uint8, or uint16 above 8 bits), rounded and clipped to the sample range."""
    count, height, width, _ = rgb.shape
    i420_shape(height, width)  # both sides even, or ValueError
    peak = 255.0 if rgb.dtype == torch.uint8 else 65535.0
    yuv = (rgb.float() / peak) @ _matrix(spec.from_rgb_matrix(), rgb).T  # N, H, W, 3
    y_off, y_scale = spec.luma_offset_scale
    c_off, c_scale = spec.chroma_offset_scale
    y = yuv[..., 0] * y_scale + y_off
    u = _downsample(yuv[..., 1]) * c_scale + c_off
    v = _downsample(yuv[..., 2]) * c_scale + c_off
    planes = torch.cat((y.reshape(count, -1), u.reshape(count, -1), v.reshape(count, -1)), dim=1)
    samples = planes.round_().clamp_(0, spec.peak)
    dtype = torch.uint8 if spec.sample_bits == 8 else torch.uint16
    return samples.to(torch.int32).to(dtype).reshape(count, height * 3 // 2, width)


def _upsample(plane: torch.Tensor) -> torch.Tensor:
    """(N, h, w) chroma -> (N, 2h, 2w), bicubic, each chroma sample centred between its four luma
    samples: what ffmpeg's swscale assumes for 4:2:0 and what the RGB frames' filter does
    (``flags=bicubic``), within half a step on average."""
    return F.interpolate(plane.unsqueeze(1), scale_factor=2, mode="bicubic", align_corners=False).squeeze(1)


def _downsample(plane: torch.Tensor) -> torch.Tensor:
    """(N, 2h, 2w) -> (N, h, w): the mean of each 2x2 block (the same centred siting)."""
    return F.avg_pool2d(plane.unsqueeze(1), 2).squeeze(1)


def upscale_i420(upscaler: RgbUpscaler, frames: np.ndarray, scale: float | None, spec: YuvSpec) -> np.ndarray:
    """Upscale (N, H * 3 / 2, W) planar 4:2:0 frames into planar 4:2:0 frames of the output size.

    An upscaler with its own ``upscale_yuv`` (the torch runtime: conversion on its device) does it
    all; any other (``upscale`` on RGB only) gets RGB converted here, with torch on the CPU.
    """
    own = getattr(upscaler, "upscale_yuv", None)
    if own is not None:
        return np.asarray(own(frames, scale, spec))
    with torch.inference_mode():
        rgb = i420_to_rgb(torch.from_numpy(np.ascontiguousarray(frames)), spec).numpy()
        out = upscaler.upscale(rgb, scale)
        return rgb_to_i420(torch.from_numpy(np.ascontiguousarray(out)), spec).numpy()
