"""A deterministic in-memory batch source with the pipeline's interface (for loop tests)."""

import json

import numpy as np


class SyntheticIterator:
    """Per-process batches that depend only on (seed, global batch index, process)."""

    def __init__(self, cfg, local_batch_size, process_index=0, process_count=1, seed=0):
        self.cfg, self.bs, self.pi, self.pc, self.seed = (
            cfg, local_batch_size, process_index, process_count, seed)  # fmt: skip
        self.index = 0

    def global_batch(self, index):
        """The whole global batch for `index` (what every process's shards add up to)."""
        s, g = self.cfg.model.input_size, self.cfg.data.max_boxes
        n = self.bs * self.pc
        rng = np.random.default_rng([self.seed, index])
        image = rng.normal(0, 40, (n, s, s, 3)).astype(np.float32)
        xy = rng.uniform(0, 0.6, (n, g, 2))
        wh = rng.uniform(0.1, 0.4, (n, g, 2))
        boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
        labels = rng.integers(1, self.cfg.model.num_classes, (n, g)).astype(np.int32)
        valid = np.arange(g)[None, :] < rng.integers(0, 4, (n, 1))
        for b in range(n):  # paint the boxes so there is something to learn
            for k in np.flatnonzero(valid[b]):
                x1, y1, x2, y2 = (boxes[b, k] * s).astype(int)
                image[b, y1:y2, x1:x2, labels[b, k] % 3] += 100.0
        return {"image": image, "boxes": boxes, "labels": labels, "valid": valid,
                "mask": np.ones(n, bool)}  # fmt: skip

    def __iter__(self):
        return self

    def __next__(self):
        full = self.global_batch(self.index)
        self.index += 1
        sl = slice(self.pi * self.bs, (self.pi + 1) * self.bs)
        return {k: v[sl] for k, v in full.items()}

    def get_state(self):
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state):
        self.index = json.loads(state)["index"]


def make_synthetic(cfg, local_batch_size, process_index=0, process_count=1):
    return SyntheticIterator(cfg, local_batch_size, process_index, process_count)
