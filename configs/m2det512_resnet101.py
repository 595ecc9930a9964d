"""M2Det512 with ResNet-101 (the 320 ResNet-101 settings at 512).

Run: m2det train --config configs/m2det512_resnet101.py --workdir /tmp/m2det512_resnet101
Convert official weights:
  m2det convert --config configs/m2det512_resnet101.py --checkpoint m2det512_resnet101.pth \
    --output /tmp/m2det512_resnet101_converted
"""

from m2det_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "resnet101"
    c.model.input_size = 512
    c.train.batch_size = 48  # per_batch_size x 4 GPUs, as the original README trains
    return c
