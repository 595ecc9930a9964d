"""The original M2Det network (PyTorch), built from a clone of the official repository
for timing beside ours: `python benchmarks/forward.py --vs-original PATH`.

Nothing of it is copied here: PATH is the user's clone of github.com/qijiezhao/M2Det,
imported as is. Its model file imports torchvision and a training helper module
(`utils.core`, which pulls in the data loaders and the compiled NMS) that the network does
not use; stand-ins for those two are registered before the import, so only torch
(`pip install -e '.[torch]'`) is needed.
"""

from __future__ import annotations

import os
import sys
import types


def build_original(path: str, cfg):
    """The original's `M2Det('test', size, config)` for our `cfg` (VGG or ResNet
    backbones), in eval mode with PyTorch's default initialisation."""
    if not os.path.isfile(os.path.join(path, "m2det.py")):
        raise SystemExit(f"error: --vs-original {path}: no m2det.py there (a clone of "
                         "github.com/qijiezhao/M2Det is expected)")  # fmt: skip
    sys.path.insert(0, os.path.abspath(path))
    for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("utils")
    utils.__path__ = [os.path.join(os.path.abspath(path), "utils")]  # its other modules load
    core = types.ModuleType("utils.core")
    core.print_info = lambda *args, **kwargs: None
    utils.core = core
    sys.modules["utils"], sys.modules["utils.core"] = utils, core
    import m2det  # noqa: PLC0415 - the clone's module, importable only now

    m = cfg.model
    vgg = m.backbone.startswith("vgg")
    config = dict(backbone=m.backbone, net_family="vgg" if vgg else "res",
                  base_out=[22, 34] if vgg else [2, 4], planes=m.planes,
                  num_levels=m.num_levels, num_scales=m.num_scales, sfam=m.sfam,
                  smooth=m.smooth, num_classes=m.num_classes)  # fmt: skip
    return m2det.build_net("test", int(m.input_size), config).eval()
