"""TFDS builders we generate ourselves: `shapes` (the embedded synthetic set), `coco_folder`
(any COCO-format folder), `voc_folder` (any VOC-format folder)."""
