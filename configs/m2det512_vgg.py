"""M2Det512 with VGG16 (official m2det512_vgg.py; released checkpoint m2det512_vgg.pth).

Run: m2det train --config configs/m2det512_vgg.py --workdir /tmp/m2det512_vgg
Convert official weights:
  m2det convert --config configs/m2det512_vgg.py --checkpoint m2det512_vgg.pth \
    --output /tmp/m2det512_vgg_converted
"""

from m2det_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "vgg16"
    c.model.input_size = 512
    c.train.batch_size = 64  # per_batch_size x 4 GPUs, as the original README trains
    return c
