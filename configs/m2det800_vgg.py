"""M2Det800 with VGG16 (official m2det800_vgg.py).

Run: m2det train --config configs/m2det800_vgg.py --workdir /tmp/m2det800_vgg
Convert official weights:
  m2det convert --config configs/m2det800_vgg.py --checkpoint m2det800_vgg.pth \
    --output /tmp/m2det800_vgg_converted
"""

from m2det_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "vgg16"
    c.model.input_size = 800
    c.train.batch_size = 36  # per_batch_size x 4 GPUs, as the original README trains
    return c
