"""M2Det320 with VGG16 on PASCAL VOC (official m2det320_vgg.py with its VOC settings).

Trains on VOC 2007 trainval + 2012 trainval (16,551 images), tests on VOC 2007 test
(4,952) with the VOC2007 11-point mAP at IoU 0.5; 21 classes (20 + background); difficult
objects left out of training and ignored by the metric (`m2det_jax.config.voc0712`).
Both sets must be prepared once (array_record) in data_dir; nothing is downloaded here:
  python -c "import tensorflow_datasets as tfds
  [tfds.builder(n, data_dir='/data/tfds', file_format='array_record').download_and_prepare()
   for n in ('voc/2007', 'voc/2012')]"

Run: m2det train --config configs/m2det320_vgg_voc.py --workdir /tmp/m2det320_vgg_voc \
  --config.data.data_dir=/data/tfds
Fine-tune from converted COCO weights (the class heads are re-initialised for 21):
  ... --config.train.init_checkpoint=/tmp/m2det320_vgg_converted
Your own VOC-format folder (trains on ImageSets/Main/trainval.txt, tests on test.txt):
  --config.data.dataset=voc_folder --config.data.root=DIR --config.model.num_classes=<N+1>

The learning-rate steps are the original config's step_lr.VOC (epochs 100, 150, 200, 250,
300). The released train.py applies step_lr.COCO whatever the dataset (epochs 90 ... 160);
to reproduce that run: --config.train.lr_epochs="(90,110,130,150,160)"
--config.train.num_epochs=160.
"""

from m2det_jax.config import default_config, voc0712


def get_config():
    c = voc0712(default_config())
    c.model.backbone = "vgg16"
    c.model.input_size = 320
    c.train.batch_size = 64  # per_batch_size x 4 GPUs, as the original README trains
    return c
