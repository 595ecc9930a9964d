"""Backbones returning the two taps FFMv1 fuses: (shallow [B,H/8,W/8,C1], deep [B,H/16,W/16,C2]).

VGG16-reduced (docs/original.md §1.1): taps after the conv4_3 ReLU (512 ch) and the conv7 ReLU
(1024 ch). ResNet (§1.2): taps after layer2 and layer4, layer3 with stride 1 as the
original builds it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2det_jax.models.layers import max_pool, remat_block

# Output channels of each conv of VGG16-reduced.
VGG_FEATURES = {
    "conv1_1": 64, "conv1_2": 64, "conv2_1": 128, "conv2_2": 128, "conv3_1": 256,
    "conv3_2": 256, "conv3_3": 256, "conv4_1": 512, "conv4_2": 512, "conv4_3": 512,
    "conv5_1": 512, "conv5_2": 512, "conv5_3": 512, "conv6": 1024, "conv7": 1024,
}  # fmt: skip
# Index of each conv in the original `base` ModuleList.
VGG_TORCH_INDEX = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
    "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26,
    "conv5_3": 28, "conv6": 31, "conv7": 33,
}  # fmt: skip


# VGG16-reduced cut into the stages that `train.remat` rematerialises one at a time: each
# ends where the next pool begins, so a stage's output is its only activation kept for
# backward. Stage 4 ends at conv4_3, the shallow tap.
VGG_STAGES = (
    ("conv1_1", "conv1_2"),
    ("pool1", "conv2_1", "conv2_2"),
    ("pool2", "conv3_1", "conv3_2", "conv3_3"),
    ("pool3", "conv4_1", "conv4_2", "conv4_3"),
    ("pool4", "conv5_1", "conv5_2", "conv5_3", "pool5", "conv6", "conv7"),
)


class VGG16Reduced(nn.Module):
    """SSD's VGG16 with fc6/fc7 as a dilated conv6 and a 1x1 conv7 (no BatchNorm).

    `remat` "stages"/"dots" rematerialise each of `VGG_STAGES` on its own (one block for the
    whole backbone would hold all its activations during its backward: no saving). The
    parameter names do not depend on `remat`.
    """

    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        stage = VGG16Reduced._stage
        if self.remat in ("stages", "dots"):
            policy = jax.checkpoint_policies.dots_saveable if self.remat == "dots" else None
            stage = nn.remat(VGG16Reduced._stage, static_argnums=(2,), policy=policy)
        for layers in VGG_STAGES[:4]:
            x = stage(self, x, layers)
        shallow = x  # [B, S/8, S/8, 512] after the conv4_3 ReLU
        return shallow, stage(self, x, VGG_STAGES[4])  # deep: [B, S/16, S/16, 1024]

    def _stage(self, x, layers: tuple[str, ...]):
        for name in layers:
            if name == "pool3":
                x = max_pool(x, 2, 2, ceil_mode=True)
            elif name == "pool5":
                x = max_pool(x, 3, 1, padding=1)
            elif name.startswith("pool"):
                x = max_pool(x, 2, 2)
            elif name == "conv6":
                x = nn.Conv(VGG_FEATURES[name], (3, 3), padding=6, kernel_dilation=6,
                            dtype=self.dtype, name=name)(x)  # fmt: skip
            elif name == "conv7":
                x = nn.Conv(VGG_FEATURES[name], (1, 1), dtype=self.dtype, name=name)(x)
            else:
                x = nn.Conv(VGG_FEATURES[name], (3, 3), padding=1, dtype=self.dtype, name=name)(x)
            if not name.startswith("pool"):
                x = nn.relu(x)
        return x


class ResNetBlock(nn.Module):
    """BasicBlock (ResNet-18/34) or Bottleneck (50/101; stride on the 3x3 like torchvision)."""

    planes: int
    stride: int
    bottleneck: bool
    downsample: bool
    momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv(f, k, s, name):
            return nn.Conv(
                f, (k, k), strides=s, padding=k // 2, use_bias=False, dtype=self.dtype, name=name
            )

        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                dtype=self.dtype, name=name,
            )  # fmt: skip

        identity = x
        if self.bottleneck:
            out_ch = self.planes * 4
            y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, "conv1")(x)))
            y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, "conv2")(y)))
            y = bn("bn3")(conv(out_ch, 1, 1, "conv3")(y))
        else:
            out_ch = self.planes
            y = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
            y = bn("bn2")(conv(self.planes, 3, 1, "conv2")(y))
        if self.downsample:
            identity = bn("downsample_bn")(conv(out_ch, 1, self.stride, "downsample_conv")(x))
        return nn.relu(y + identity)


RESNET_SPECS = {  # depth: (blocks per stage, bottleneck)
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}


class ResNet(nn.Module):
    """torchvision-layout ResNet; names follow torchvision (`layer1_0/conv1`, ...)."""

    depth: int = 101
    layer3_stride: int = 1
    width: int = 64  # stem / layer1 width (torchvision: 64); smaller for tiny configs
    momentum: float = 0.9
    dtype: Any = jnp.float32
    remat: str = "none"  # train.remat: "stages"/"dots" wrap each residual block

    @nn.compact
    def __call__(self, x, train: bool = False):
        block = remat_block(ResNetBlock, self.remat, 2)
        blocks, bottleneck = RESNET_SPECS[self.depth]
        x = nn.Conv(self.width, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype,
                    name="conv1")(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                         dtype=self.dtype, name="bn1")(x)  # fmt: skip
        x = max_pool(nn.relu(x), 3, 2, padding=1)
        in_ch = self.width
        taps = []
        widths = tuple(self.width * m for m in (1, 2, 4, 8))
        for stage, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            stride = (1, 2, self.layer3_stride, 2)[stage]
            out_ch = planes * 4 if bottleneck else planes
            for k in range(n):
                s = stride if k == 0 else 1
                x = block(
                    planes, s, bottleneck, downsample=(k == 0 and (s != 1 or in_ch != out_ch)),
                    momentum=self.momentum, dtype=self.dtype, name=f"layer{stage + 1}_{k}",
                )(x, train)  # fmt: skip
                in_ch = out_ch
            taps.append(x)
        return taps[1], taps[3]  # layer2 [B,S/8,S/8,512|128], layer4 [B,S/16,S/16,2048|512]


def make_backbone(name: str, dtype, layer3_stride: int = 1, momentum: float = 0.9,
                  width: int = 64, remat: str = "none") -> nn.Module:  # fmt: skip
    """The backbone module, named "backbone". `remat` ("stages"/"dots"): VGG is
    rematerialised per stage (`VGG_STAGES`), ResNet per residual block."""
    if name == "vgg16":
        return VGG16Reduced(dtype=dtype, remat=remat, name="backbone")
    if name.startswith("resnet") and int(name[6:]) in RESNET_SPECS:
        return ResNet(int(name[6:]), layer3_stride, width, momentum, dtype=dtype,
                      remat=remat, name="backbone")  # fmt: skip
    raise ValueError(f"model.backbone={name!r}: unknown backbone")
