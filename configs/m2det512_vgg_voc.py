"""M2Det512 with VGG16 on PASCAL VOC (official m2det512_vgg.py with its VOC settings).

The VOC0712 setting of `m2det_jax.config.voc0712`, as `m2det320_vgg_voc.py` (which says
how to prepare voc/2007 and voc/2012, fine-tune and use your own folder) at 512.

Run: m2det train --config configs/m2det512_vgg_voc.py --workdir /tmp/m2det512_vgg_voc \
  --config.data.data_dir=/data/tfds
"""

from m2det_jax.config import default_config, voc0712


def get_config():
    c = voc0712(default_config())
    c.model.backbone = "vgg16"
    c.model.input_size = 512
    c.train.batch_size = 64  # per_batch_size x 4 GPUs, as the original README trains
    return c
