"""The whole M2Det network: backbone -> FFMv1 -> (FFMv2 + TUM) x L -> SFAM -> Norm -> heads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2det_jax.config import validate
from m2det_jax.core.priors import num_anchors
from m2det_jax.models.backbones import make_backbone
from m2det_jax.models.layers import remat_block
from m2det_jax.models.mlfpn import SFAM, TUM, FFMv1, FFMv2

# PyTorch's default Conv2d init (kaiming_uniform, a=sqrt(5)), which the original keeps for
# the loc/conf heads (docs/original.md §1.9); their biases are zeroed.
_TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class M2Det(nn.Module):
    """M2Det. `__call__(images [B,S,S,3], train) -> {"loc": [B,P,4], "logits": [B,P,C]}`.

    Priors are ordered scale (largest map first), row, column, anchor: the original order.
    `remat` (`train.remat`): "stages"/"dots" put each backbone block, FFMv1, FFMv2, TUM and
    SFAM under `nn.remat`; "full" the whole forward pass under one. Parameter and variable
    names are the same for every value; only the backward pass's memory/compute change.
    """

    backbone: str = "vgg16"
    num_classes: int = 81
    planes: int = 256
    num_levels: int = 8
    num_scales: int = 6
    smooth: bool = True
    sfam: bool = False
    share_ffmv2: bool = True
    share_sfam: bool = True
    sfam_reduction: int = 16
    num_anchors: int = 6
    resnet_layer3_stride: int = 1
    resnet_width: int = 64
    bn_momentum: float = 0.99
    norm_momentum: float = 0.9
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.remat == "full":  # one checkpoint: only the images are kept for backward
            return nn.remat(M2Det._forward, static_argnums=(2,))(self, images, train)
        return self._forward(images, train)

    def _forward(self, images, train: bool):
        ffmv1, ffmv2 = remat_block(FFMv1, self.remat, 3), remat_block(FFMv2, self.remat, 2)
        tum, sfam = remat_block(TUM, self.remat, 2), remat_block(SFAM, self.remat)
        x = images.astype(self.dtype)
        shallow, deep = make_backbone(
            self.backbone, self.dtype, self.resnet_layer3_stride, self.norm_momentum,
            self.resnet_width, self.remat,
        )(x, train)
        self.sow("intermediates", "backbone_shallow", shallow)
        self.sow("intermediates", "backbone_deep", deep)
        base = ffmv1(self.bn_momentum, self.dtype, name="ffmv1")(shallow, deep, train)
        self.sow("intermediates", "base_feature", base)  # [B, H, W, 768]

        half = self.planes // 2
        if self.share_ffmv2:
            # One module used by every level (the original): identical outputs, computed once.
            shared = ffmv2(half, self.bn_momentum, self.dtype, name="ffmv2")(base, train)
            ffmv2_outs = [shared] * self.num_levels
        else:
            ffmv2_outs = [
                ffmv2(half, self.bn_momentum, self.dtype, name=f"ffmv2_{lvl}")(base, train)
                for lvl in range(self.num_levels)
            ]
        self.sow("intermediates", "ffmv2_out", ffmv2_outs[0])  # [B, H, W, planes/2]

        tum_outs = []
        for lvl in range(self.num_levels):
            tin = ffmv2_outs[lvl]
            if lvl > 0:  # FFMv2 output first, then the previous TUM's largest output
                tin = jnp.concatenate([tin, tum_outs[-1][-1]], axis=-1)
            outs = tum(self.planes, self.num_scales, self.smooth, self.bn_momentum, self.dtype,
                       name=f"tum_{lvl}")(tin, train)  # fmt: skip
            self.sow("intermediates", f"tum{lvl + 1}", outs)  # smallest map first
            tum_outs.append(outs)

        # sources[s]: concat over levels of each TUM's output s, largest map first.
        sources = [
            jnp.concatenate([outs[self.num_scales - 1 - s] for outs in tum_outs], axis=-1)
            for s in range(self.num_scales)
        ]  # [B, H_s, W_s, planes * num_levels]
        if self.sfam:
            sources = sfam(self.num_scales, self.sfam_reduction, self.share_sfam, self.dtype,
                           name="sfam")(sources)  # fmt: skip
        self.sow("intermediates", "source0_before_norm", sources[0])
        sources[0] = nn.BatchNorm(
            use_running_average=not train, momentum=self.norm_momentum, epsilon=1e-5,
            dtype=self.dtype, name="norm",
        )(sources[0])  # fmt: skip

        locs, confs = [], []
        for s, src in enumerate(sources):
            self.sow("intermediates", f"head_input{s}", src)
            head = dict(padding=1, dtype=self.dtype, kernel_init=_TORCH_DEFAULT_INIT)
            loc = nn.Conv(self.num_anchors * 4, (3, 3), name=f"loc_{s}", **head)(src)
            conf = nn.Conv(self.num_anchors * self.num_classes, (3, 3), name=f"conf_{s}",
                           **head)(src)  # fmt: skip
            b = src.shape[0]
            locs.append(loc.reshape(b, -1, 4))  # (y, x, anchor) order
            confs.append(conf.reshape(b, -1, self.num_classes))
        return {
            "loc": jnp.concatenate(locs, axis=1).astype(jnp.float32),  # [B, P, 4]
            "logits": jnp.concatenate(confs, axis=1).astype(jnp.float32),  # [B, P, C]
        }


def abstract_variables(cfg, model: M2Det | None = None):
    """The variable tree of `cfg` as ShapeDtypeStructs (nothing is computed)."""
    model = model or build_model(cfg)
    s = cfg.model.input_size
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.float32))
    )


def build_model(cfg) -> M2Det:
    """The M2Det module for `cfg` (validated)."""
    validate(cfg)
    m = cfg.model
    return M2Det(
        backbone=m.backbone,
        num_classes=m.num_classes,
        planes=m.planes,
        num_levels=m.num_levels,
        num_scales=m.num_scales,
        smooth=m.smooth,
        sfam=m.sfam,
        share_ffmv2=m.share_ffmv2,
        share_sfam=m.share_sfam,
        sfam_reduction=m.sfam_reduction,
        num_anchors=num_anchors(cfg),
        resnet_layer3_stride=m.resnet_layer3_stride,
        resnet_width=m.resnet_width,
        bn_momentum=m.bn_momentum,
        norm_momentum=m.norm_momentum,
        dtype=jnp.dtype(m.dtype),
        remat=cfg.train.remat,
    )
