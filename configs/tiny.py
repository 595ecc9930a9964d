"""A tiny M2Det for tests: the real TUM/FFM/SFAM path, seconds on a CPU.

Run: m2det train --config configs/tiny.py --workdir /tmp/tiny
"""

from m2det_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "resnet18"
    c.model.input_size = 64
    c.model.num_classes = 4
    c.model.planes = 16
    c.model.num_levels = 2
    c.model.num_scales = 3
    c.model.sfam = True
    c.model.sfam_reduction = 4
    c.train.batch_size = 8
    c.data.max_boxes = 8
    return c
