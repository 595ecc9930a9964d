"""M2Det320 with ResNet-101 (official m2det320_resnet101.py; layer3 stride 1).

Run: m2det train --config configs/m2det320_resnet101.py --workdir /tmp/m2det320_resnet101
Convert official weights:
  m2det convert --config configs/m2det320_resnet101.py --checkpoint m2det320_resnet101.pth \
    --output /tmp/m2det320_resnet101_converted
"""

from m2det_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "resnet101"
    c.model.input_size = 320
    c.train.batch_size = 48  # per_batch_size x 4 GPUs, as the original README trains
    return c
