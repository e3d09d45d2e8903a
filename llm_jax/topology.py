"""TPU slices by name: Cloud TPU names and topologies, chips, HBM and peaks per chip, and the
compile-only devices libtpu makes for a slice that is not here (`--mode=compile`).

Cloud TPU names count differently by generation. v4 and v5p names count TensorCores, two per
chip, and JAX drives each chip as one "megacore" device: v5p-128 is 64 chips, 64 devices,
topology v5p:4x4x4. v5e and v6e names count chips, one TensorCore each: v6e-256 is 256 chips,
topology v6e:16x16. libtpu accepts only the topology form, so Cloud names are mapped here (the
power-of-two sizes; other shapes, such as v5p:4x4x20, are given in the topology form).

`parse_target` is compile_topology's one parser: NVIDIA GPU names (h100, 8xh100) go to
gpu_targets.py, the rest are TPU slices.

This module imports no jax at load time: config validation parses names without a backend.
"""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile

from llm_jax import errors

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as in the topology form: "v5p"
  cloud_names: tuple[str, ...]  # Cloud TPU name prefixes: ("v5e", "v5litepod")
  cores_per_name_unit: int  # TensorCores counted per chip by the Cloud name (2 for v4 and v5p)
  ndim: int  # topology dimensions: 3 (v4, v5p: 3-D torus) or 2 (v5e, v6e)
  hbm_bytes: int  # per chip (= per device: one device per chip for all of these)
  hbm_bytes_per_s: float  # per chip
  device_kind: str  # jax's device_kind for its devices
  megacore: bool  # both TensorCores of a chip as one device (libtpu chip_config_name)

  @property
  def peak_bf16_flops(self) -> float:
    """Dense bf16 FLOP/s per chip, from metrics.PEAK_BF16_FLOPS."""
    from llm_jax import metrics  # pylint: disable=g-import-not-at-top  (imports jax)
    return metrics.peak_flops_per_device(self.device_kind)


# HBM capacity and bandwidth per chip, from the Google Cloud TPU documentation.
GENERATIONS = {
    "v4": Generation("v4", ("v4",), 2, 3, 32 * GIB, 1228e9, "TPU v4", True),
    "v5p": Generation("v5p", ("v5p",), 2, 3, 95 * GIB, 2765e9, "TPU v5", True),
    "v5e": Generation("v5e", ("v5e", "v5litepod"), 1, 2, 16 * GIB, 819e9, "TPU v5 lite", False),
    "v6e": Generation("v6e", ("v6e",), 1, 2, 32 * GIB, 1640e9, "TPU v6 lite", False),
}

# Chips -> topology shape for the power-of-two slice sizes (as gcloud and xpk lay them out).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
             4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}
MAX_CHIPS = {"v4": 2048, "v5p": 4096, "v5e": 256, "v6e": 256}


class TopologyError(errors.UserError):
  """An unknown slice name, or libtpu missing or refusing the topology."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: a generation and its chip grid."""
  gen: Generation
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    return f"{self.gen.name}:{'x'.join(map(str, self.shape))}"

  @property
  def cloud_name(self) -> str | None:
    shapes = SHAPES_3D if self.gen.ndim == 3 else SHAPES_2D
    if shapes.get(self.chips) != self.shape:
      return None
    return f"{self.gen.cloud_names[0]}-{self.chips * self.gen.cores_per_name_unit}"

  def describe(self) -> str:
    names = " = ".join(n for n in (self.cloud_name, self.topology) if n)
    return (f"{names}: {self.chips} chip(s), {self.chips} device(s) of {self.gen.device_kind}, "
            f"{self.gen.hbm_bytes / GIB:g} GiB HBM each")


def _shape_table(gen: Generation) -> dict:
  shapes = SHAPES_3D if gen.ndim == 3 else SHAPES_2D
  return {c: s for c, s in shapes.items() if c <= MAX_CHIPS[gen.name]}


def known_names() -> str:
  """The accepted names, one line per generation, for error messages and the README."""
  lines = []
  for gen in GENERATIONS.values():
    table = _shape_table(gen)
    counts = ",".join(str(c * gen.cores_per_name_unit) for c in table)
    unit = "TensorCores, 2 per chip" if gen.cores_per_name_unit == 2 else "chips"
    lines.append(f"{'/'.join(gen.cloud_names)}-{{{counts}}} ({unit}) or "
                 f"{gen.name}:{'x'.join(map(str, table[64]))}")
  return "; ".join(lines)


def parse(name: str) -> Slice:
  """A Cloud TPU name (v5p-128, v5litepod-16, v6e-256) or topology (v5p:4x4x4) -> Slice."""
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+)([:-])(\d+(?:x\d+)*)", text)
  gen = None
  if m:
    prefix, sep, rest = m.groups()
    prefix = {"v5": "v5p", "v5litepod": "v5e"}.get(prefix, prefix) if sep == ":" else prefix
    gen = next((g for g in GENERATIONS.values()
                if (prefix == g.name if sep == ":" else prefix in g.cloud_names)), None)
  if gen is None:
    from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
    raise TopologyError(f"compile_topology={name!r} is not a TPU slice or GPU target this knows. "
                        f"Known TPU slices: {known_names()}. Known GPU targets: "
                        f"{gpu_targets.known_names()}")
  if sep == ":":
    shape = tuple(int(s) for s in rest.split("x"))
    if len(shape) != gen.ndim or min(shape) < 1:
      raise TopologyError(f"compile_topology={name!r}: a {gen.name} topology has {gen.ndim} "
                          f"dimensions, e.g. {gen.name}:{'x'.join(['4'] * gen.ndim)}")
    return Slice(gen, shape)
  count = int(rest)
  chips, odd = divmod(count, gen.cores_per_name_unit)
  table = _shape_table(gen)
  if odd or chips not in table:
    raise TopologyError(
        f"compile_topology={name!r}: {gen.cloud_names[0]} slices this maps are "
        f"{', '.join(f'{gen.cloud_names[0]}-{c * gen.cores_per_name_unit}' for c in table)}"
        f"{' (the number counts TensorCores, 2 per chip)' if gen.cores_per_name_unit == 2 else ''}"
        f"; give another shape in the topology form, e.g. {gen.name}:"
        f"{'x'.join(map(str, table[max(table)]))}")
  return Slice(gen, table[chips])


def parse_target(name: str):
  """compile_topology -> gpu_targets.Target for an NVIDIA GPU name (h100, 8xh100), else the
  TPU Slice `parse` makes of it (raising for a name that is neither)."""
  from llm_jax import gpu_targets  # pylint: disable=g-import-not-at-top
  return gpu_targets.parse(name) or parse(name)


def generation_of(device_kind: str) -> Generation | None:
  """The Generation whose jax device_kind is `device_kind` (None for CPUs, GPUs, others)."""
  return next((g for g in GENERATIONS.values() if g.device_kind == device_kind), None)


# ---------------------------------------------------------------------------------- libtpu


def libtpu_requirement() -> str:
  """The libtpu requirement the installed jax pins in its [tpu] extra, e.g. 'libtpu==0.0.50.*'."""
  try:
    for req in importlib.metadata.requires("jax") or []:
      if req.startswith("libtpu") and "tpu" in req.partition(";")[2]:
        return req.partition(";")[0].strip().replace(" ", "")
  except importlib.metadata.PackageNotFoundError:
    pass
  return "libtpu"


def _has_libtpu() -> bool:
  return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def install_hint() -> str:
  jax_version = importlib.metadata.version("jax")
  return (f"compiling for a TPU slice needs libtpu, which is not installed: pip install -e "
          f"\".[tpu]\" (or pip install '{libtpu_requirement()}', the libtpu jax {jax_version} "
          f"pins); it runs on any Linux x86-64 host, no TPU needed")


@contextlib.contextmanager
def _stderr_to(file):
  """Points file descriptor 2 at `file` (libtpu's C++ start-up warnings about a missing TPU)."""
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def devices(sl: Slice, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices `sl` (one per chip; no TPU needed here).

  jax.jit(...).lower(...).compile() for a mesh of these devices compiles for the TPU; nothing
  can run on them. On a host without a TPU libtpu warns at start-up that it found no TPU:
  those lines are dropped unless it fails.
  """
  if not _has_libtpu():
    raise TopologyError(install_hint())
  # Only compiles, never touches a chip: let it load beside any process holding libtpu's lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if sl.gen.ndim == 3:
    host = (2, 2, 1)  # 4 chips per host
    wrap = (min(sl.shape) >= 4,) * 3  # full 4x4x4 cubes and up are tori
  else:
    host = (1, 1, 1) if sl.chips == 1 else (2, 4, 1) if sl.chips == 8 else (2, 2, 1)
    wrap = tuple(s == 16 for s in sl.shape) + (False,)
  kwargs = dict(chips_per_host_bounds=host, wrap=wrap, num_slices=num_slices)
  if sl.gen.megacore:
    kwargs["chip_config_name"] = "megacore"
  with tempfile.TemporaryFile(mode="w+") as log:
    try:
      with _stderr_to(log):
        topo = topologies.get_topology_desc(topology_name=sl.topology, platform="tpu", **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      log.seek(0)
      raise TopologyError(f"libtpu refused topology {sl.topology} x{num_slices} slice(s): {e}\n"
                          f"{log.read()[-2000:]}") from e
  return list(topo.devices)


def choose_platform(compile_for_slice: bool = False) -> None:
  """Keeps jax off the TPU backend where no TPU is attached, and off the host's devices when
  compiling for a TPU slice (which gets compile-only devices of its own).

  libtpu, installed for --mode=compile, would otherwise make every jax program on a machine
  without a TPU try to start one, warn about it and take libtpu's lock file. Call before anything
  initialises a jax backend (main.py, experiments/, bench/ do); JAX_PLATFORMS, when set, wins.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
    return
  if compile_for_slice:
    jax.config.update("jax_platforms", "cpu")
    return
  if not _has_libtpu():
    return
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top  (jax's own checks)
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
        and not hardware_utils.has_visible_nvidia_gpu()):
      jax.config.update("jax_platforms", "cpu")
  except (ImportError, AttributeError):
    pass
