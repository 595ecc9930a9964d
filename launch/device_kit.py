"""The device kit: run the project on an accelerator image that has JAX but no network.

A CUDA (or TPU) machine image usually ships Python 3.12 with jax, jaxlib and its plugin,
flax, optax, orbax-checkpoint and the scientific stack, and reaches no package index. A
jaxlib with its CUDA plugin is far too big to carry there, and it is there already; what
the project needs beyond the image is small. This script

  python launch/device_kit.py build [KIT]        # here, with network: the wheels, <= 60 MiB
  python3 launch/device_kit.py run [KIT] -- ARGS # there, offline: install into KIT/site,
                                                 # then benchmarks/device_check.py ARGS

`build` downloads, for CPython 3.12 on manylinux x86_64, the exact versions that
constraints/newest.txt pins of every distribution in KIT_PACKAGES (wheels; a pure-Python
one published only as a source archive is built into a wheel here) into KIT/wheels
(default build/device_kit). `run` installs them with `pip --no-index --no-deps --target
KIT/site` (the image's own packages stay as they are), puts KIT/site and the repository on
PYTHONPATH and runs the device check with ARGS. `list` prints the kit's distributions.

IMAGE_PACKAGES is what the kit expects the image to hold (the `cuda` image of our device
machines holds all of them); `tests/test_layout.py` checks that every distribution the
package needs is in one list or the other.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KIT = ROOT / "build" / "device_kit"
MAX_MIB = 60
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip

# Already on an accelerator image (and needed by the package or what it imports).
IMAGE_PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "etils", "numpy",
    "opencv-python-headless", "tqdm", "tensorboard", "absl-py", "attrs", "certifi",
    "charset-normalizer", "chex", "cloudpickle", "flatbuffers", "fsspec", "humanize",
    "idna", "markdown-it-py", "mdurl", "ml-dtypes", "msgpack", "nest-asyncio", "opt-einsum",
    "packaging", "pillow", "protobuf", "psutil", "pyarrow", "pygments", "pyyaml",
    "requests", "rich", "scipy", "simplejson", "six", "tensorstore", "toolz", "treescope",
    "typing-extensions", "urllib3", "uvloop", "wrapt", "zipp", "aiofiles", "einops",
    "colorama", "prometheus-client", "matplotlib", "contourpy", "cycler", "fonttools",
    "kiwisolver", "pyparsing", "python-dateutil",
)  # fmt: skip

# Carried: what the package needs beyond the image.
KIT_PACKAGES = (
    "ml-collections", "grain", "array-record", "dm-tree", "tensorflow-datasets",
    "tensorflow-metadata", "googleapis-common-protos", "simple-parsing", "docstring-parser",
    "promise", "immutabledict", "termcolor", "toml", "pycocotools", "faster-coco-eval",
    "tensorboardx", "importlib-resources", "portpicker", "simplejpeg", "tzdata",
)  # fmt: skip


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(path: Path = ROOT / "constraints" / "newest.txt") -> dict[str, str]:
    """{normalised name: version} of a constraints file's `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[normalise(name)] = version.strip()
    return out


def _pip(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)


def build(kit: Path) -> int:
    pins = pinned_versions()
    wheels = kit / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [n for n in KIT_PACKAGES if n not in pins]
    if missing:
        raise SystemExit(f"constraints/newest.txt: no pinned version for {', '.join(missing)}")
    target = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
              "--abi", "cp" + PYTHON.replace(".", ""), "--abi", "abi3", "--abi", "none",
              *(a for p in PLATFORMS for a in ("--platform", p))]  # fmt: skip
    for name in KIT_PACKAGES:
        spec = f"{name}=={pins[name]}"
        p = _pip("download", "--no-deps", "-q", "-d", str(wheels), *target, spec)
        if p.returncode != 0:  # a source archive only: pure Python, so a wheel built here
            p = _pip("wheel", "--no-deps", "-q", "-w", str(wheels), spec)  # serves any
            if p.returncode != 0:
                raise SystemExit(f"{spec}: no wheel could be had: {p.stderr.strip()[-500:]}")
        print(f"  {spec}")
    files = sorted(wheels.glob("*.whl"))
    mib = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} wheels, {mib:.1f} MiB in {wheels}")
    if mib > MAX_MIB:
        raise SystemExit(f"{wheels}: {mib:.1f} MiB, over the {MAX_MIB} MiB a device run carries")
    return 0


def run(kit: Path, args: list[str]) -> int:
    wheels, site = kit / "wheels", kit / "site"
    files = sorted(str(f) for f in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"{wheels}: no wheels (build the kit first: "
                         f"python launch/device_kit.py build {kit})")  # fmt: skip
    listing = "\n".join(Path(f).name for f in files) + "\n"
    marker = site / ".installed"
    if not marker.exists() or marker.read_text() != listing:  # new or changed wheels
        p = _pip("install", "-q", "--no-index", "--no-deps", "--upgrade", "--target",
                 str(site), *files)  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(f"installing {wheels} into {site} failed: {p.stderr[-2000:]}")
        marker.write_text(listing)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), *args]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("build", "run", "list"))
    ap.add_argument("kit", nargs="?", default=str(DEFAULT_KIT), help="the kit's folder")
    ap.add_argument("args", nargs=argparse.REMAINDER,
                    help="after --: arguments of benchmarks/device_check.py")  # fmt: skip
    a = ap.parse_args(argv)
    kit = Path(a.kit).resolve()
    rest = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.action == "build":
        return build(kit)
    if a.action == "run":
        return run(kit, rest)
    pins = pinned_versions()
    for name in KIT_PACKAGES:
        print(f"{name}=={pins.get(name, '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
