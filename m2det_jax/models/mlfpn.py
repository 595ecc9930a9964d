"""MLFPN: FFMv1, FFMv2, TUM and SFAM, named as in the paper (Zhao et al., AAAI 2019 §3).

Layouts follow the official code (docs/original.md §1.3-1.6) so its checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m2det_jax.models.layers import BasicConv, upsample_nearest


class FFMv1(nn.Module):
    """Base feature: concat[reduce(shallow) (256 ch), up(up_reduce(deep)) (512 ch)] -> 768 ch."""

    bn_momentum: float = 0.99
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, shallow, deep, train: bool = False):
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype)
        a = BasicConv(256, 3, 1, 1, name="reduce", **kw)(shallow, train)  # [B, H, W, 256]
        b = BasicConv(512, 1, 1, 0, name="up_reduce", **kw)(deep, train)  # [B, h, w, 512]
        self.sow("intermediates", "reduce_out", a)
        self.sow("intermediates", "up_reduce_out", b)
        b = upsample_nearest(b, a.shape[1:3])  # 2x repeat for the shipped sizes
        return jnp.concatenate([a, b], axis=-1)  # [B, H, W, 768]


class FFMv2(nn.Module):
    """FFMv2 (the official code names it "leach"): 1x1 BasicConv 768 -> planes/2 of the base
    feature."""

    features: int
    bn_momentum: float = 0.99
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, base_feature, train: bool = False):
        return BasicConv(
            self.features, 1, 1, 0, bn_momentum=self.bn_momentum, dtype=self.dtype, name="conv"
        )(base_feature, train)


class TUM(nn.Module):
    """Thinned U-shaped Module. Returns num_scales maps ordered smallest to largest.

    Encoder: num_scales-2 stride-2 3x3 convs, then one 3x3 stride-1 pad-0 conv (removes 2
    pixels: 3x3 -> 1x1 at input 320). Decoder: top 1x1 on the smallest map, then
    d(i+1) = up(d(i)) + lateral_i(e(S-2-i)) with legacy-nearest upsampling to the exact
    lateral size; smooth 1x1 convs on every output but the first.
    """

    planes: int = 256
    num_scales: int = 6
    smooth: bool = True
    bn_momentum: float = 0.99
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype)
        s = self.num_scales
        enc = [x]
        for i in range(s - 1):
            last = i == s - 2
            enc.append(
                BasicConv(self.planes, 3, 1 if last else 2, 0 if last else 1,
                          name=f"encoder_{i}", **kw)(enc[-1], train)  # fmt: skip
            )
        d = BasicConv(self.planes, 1, 1, 0, name="top", **kw)(enc[-1], train)
        outs = [d]
        for i in range(s - 1):
            lateral = enc[s - 2 - i]
            lat = BasicConv(self.planes, 3, 1, 1, name=f"lateral_{i}", **kw)(lateral, train)
            d = upsample_nearest(d, lat.shape[1:3]) + lat
            outs.append(d)
        if self.smooth:
            outs = [outs[0]] + [
                BasicConv(self.planes, 1, 1, 0, name=f"smooth_{i}", **kw)(o, train)
                for i, o in enumerate(outs[1:])
            ]
        return outs


class SFAM(nn.Module):
    """Scale-wise Feature Aggregation: channel attention (SE) per scale.

    `shared=True` is the official code (one fc1/fc2 pair for all scales); False gives one
    SE block per scale, as the paper describes.
    """

    num_scales: int
    reduction: int = 16
    shared: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sources):
        c = sources[0].shape[-1]
        if self.shared:
            pair = (
                nn.Conv(c // self.reduction, (1, 1), dtype=self.dtype, name="fc1"),
                nn.Conv(c, (1, 1), dtype=self.dtype, name="fc2"),
            )
        out = []
        for s, x in enumerate(sources):
            if self.shared:
                fc1, fc2 = pair
            else:
                fc1 = nn.Conv(c // self.reduction, (1, 1), dtype=self.dtype, name=f"fc1_{s}")
                fc2 = nn.Conv(c, (1, 1), dtype=self.dtype, name=f"fc2_{s}")
            w = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
            w = nn.sigmoid(fc2(nn.relu(fc1(w))))
            out.append(x * w)
        return out
