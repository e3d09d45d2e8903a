"""NVIDIA GPU targets by name (h100, h200, a100-80gb, 8xh100, 2x8xh100), the XLA target configs
shipped beside this module (gpu_specs/*.txtpb), and the compile-only devices JAX's CUDA plugin
makes for them on a host with no GPU and no driver (`--mode=compile`).

A name is `[HOSTS x][GPUS x]KIND`: h100 is one GPU, 8xh100 one host of 8 (NVLink), 2x8xh100 two
such hosts. XLA's deviceless compile takes a `GpuTargetConfigProto` in text form: XLA's own
device descriptions (xla/tools/hlo_opt/gpu_specs) plus the cuDNN and CUDA runtime versions,
which XLA reads to decide what it may emit (cuDNN >= 9.8 for its deviceless cuDNN paths).

What such a compile cannot know, so the report says it: there is no autotuning (GEMM tiles are
defaults: the HLO is close to a real compile, not equal); the cuDNN graphs are not built (a shape
cuDNN would reject is not caught, and their workspace is not in the memory figure); XLA's cost
analysis of the compiled program is unavailable (FLOPs are counted on the program before
optimisation, see `preopt_cost`).

This module imports no jax at load time: config validation parses names without a backend.
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re

from llm_jax import errors

GIB = 1024**3
SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
GPUS_PER_HOST = (1, 2, 4, 8)
# cuDNN and CUDA runtime the target is said to have: those the CUDA 12 plugin's wheels bring
# (nvidia-cudnn-cu12 9.x >= 9.8, CUDA 12.9), verified with jax-cuda12-plugin 0.12.0.1.
DNN_VERSION = (9, 8)
RUNTIME_VERSION = {"xla_cuda12": (12, 9), "xla_cuda13": (13, 0)}
PLUGINS = tuple(RUNTIME_VERSION)
# The most of a GPU's memory a JAX program can have: XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX
# preallocates .75 by default); the rest holds the CUDA context and the cuBLAS and cuDNN
# workspaces, none of which a compile-only memory figure counts. (XLA's own scheduler plans for
# less: 80% of the device's memory, less the program's arguments and outputs, x 0.95; above that
# it rematerialises what it can and says so.)
USABLE_FRACTION = 0.95
XLA_PLAN_FRACTION = 0.8 * 0.95  # that plan, before the arguments and outputs are taken off
# The custom calls XLA's GPU backend gives cuDNN's fused attention (forward, backward).
CUDNN_FMHA = "__cudnn$fmha"


class GpuTargetError(errors.UserError):
  """An unknown GPU target name, or the CUDA plugin missing."""


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One kind of GPU as its spec file describes it."""
  name: str  # as in target names: "h100"
  spec_file: str  # in gpu_specs/
  source: str  # where the figures come from

  def _field(self, key: str) -> str:
    m = re.search(rf"\b{key}:\s*(\"[^\"]*\"|[\d.]+)", self.spec_text())
    return m.group(1).strip('"')

  def spec_text(self) -> str:
    with open(os.path.join(SPECS, self.spec_file)) as f:
      return f.read()

  @property
  def device_kind(self) -> str:
    """jax's device_kind for its devices (the spec's device_description_str)."""
    return self._field("device_description_str")

  @property
  def hbm_bytes(self) -> int:
    return int(self._field("device_memory_size"))

  @property
  def hbm_bytes_per_s(self) -> float:
    return float(self._field("memory_bandwidth"))


GPUS = {
    "h100": Gpu("h100", "h100_sxm.txtpb", "XLA's gpu_specs/h100_sxm.txtpb"),
    "h200": Gpu("h200", "h200_sxm.txtpb", "the H100's compute (XLA's h100_sxm.txtpb) with "
                "NVIDIA's H200 data sheet memory (141 GB HBM3e, 4.8 TB/s)"),
    "a100-80gb": Gpu("a100-80gb", "a100_sxm_80.txtpb", "XLA's gpu_specs/a100_sxm_80.txtpb"),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """Hosts x GPUs per host of one kind."""
  gpu: Gpu
  hosts: int = 1
  per_host: int = 1

  @property
  def n_devices(self) -> int:
    return self.hosts * self.per_host

  @property
  def name(self) -> str:
    prefix = (f"{self.hosts}x" if self.hosts > 1 else "") + (
        f"{self.per_host}x" if self.per_host > 1 or self.hosts > 1 else "")
    return prefix + self.gpu.name

  @property
  def topology(self) -> str:
    """The plugin's topology string: partitions x hosts x devices per host."""
    return f"1x{self.hosts}x{self.per_host}"

  def describe(self) -> str:
    hosts = f"{self.hosts} host(s) x {self.per_host}" if self.hosts > 1 else f"{self.per_host}"
    return (f"{self.name}: {hosts} {self.gpu.device_kind} ({self.gpu.hbm_bytes / GIB:.1f} GiB, "
            f"{self.gpu.hbm_bytes_per_s / 1e12:.2f} TB/s each; {self.gpu.source}), "
            f"compile-only (no GPU here)")


def known_names() -> str:
  kinds = ", ".join(GPUS)
  return (f"{kinds} (one GPU), NxKIND for N of {'/'.join(map(str, GPUS_PER_HOST))} GPUs on one "
          f"host (8xh100), HxNxKIND for H hosts (2x8xh100)")


def parse(name: str) -> Target | None:
  """A GPU target name -> Target; None when `name` names no GPU kind (a TPU slice, say)."""
  text = name.strip().lower()
  m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?([a-z][a-z0-9\-]*)", text)
  kind = m and m.group(3)
  if not m or not any(kind == g or kind.startswith(g.split("-")[0]) for g in GPUS):
    return None
  if kind not in GPUS:
    raise GpuTargetError(f"compile_topology={name!r}: no GPU {kind!r} here. Known GPU targets: "
                         f"{known_names()}")
  first, second = (int(g) if g else None for g in m.groups()[:2])
  hosts, per_host = (first, second) if second is not None else (1, first or 1)
  if per_host not in GPUS_PER_HOST or hosts < 1:
    raise GpuTargetError(f"compile_topology={name!r}: a host holds {'/'.join(map(str, GPUS_PER_HOST))}"
                         f" GPUs; for more, give hosts x GPUs per host, e.g. "
                         f"{max(1, math.ceil(per_host / 8))}x8x{kind}")
  return Target(GPUS[kind], hosts, per_host)


def by_device_kind(device_kind: str) -> Gpu | None:
  return next((g for g in GPUS.values() if g.device_kind == device_kind), None)


def usable_bytes(device_kind: str, hbm_bytes: int | None) -> int | None:
  """What a program may take of `hbm_bytes` on a device of `device_kind`: USABLE_FRACTION of
  it on a GPU target, all of it elsewhere (the TPU compiler enforces its own limit)."""
  if hbm_bytes is None or by_device_kind(device_kind) is None:
    return hbm_bytes
  return int(hbm_bytes * USABLE_FRACTION)


def usable_note(hbm_bytes: int) -> str:
  return (f" (a JAX program gets at most {USABLE_FRACTION:.0%} of a GPU's memory, "
          f"{hbm_bytes * USABLE_FRACTION / GIB:.2f} GiB, with XLA_PYTHON_CLIENT_MEM_FRACTION="
          f"{USABLE_FRACTION:g}; the CUDA context and cuDNN/cuBLAS workspaces take the rest)")


# ------------------------------------------------------------------------ the CUDA plugin


def installed_plugin() -> str | None:
  """The module name of the installed JAX CUDA plugin (xla_cuda12 / xla_cuda13), or None."""
  try:
    return next((p for p in PLUGINS if importlib.util.find_spec(f"jax_plugins.{p}")), None)
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return None


def install_hint() -> str:
  return ("compiling for an NVIDIA GPU target needs JAX's CUDA plugin, which is not installed: "
          "pip install -e \".[cuda]\" (jax[cuda12], about 5.5 GB with the NVIDIA wheels); it runs "
          "on any Linux x86-64 host, no GPU or driver needed")


def target_config(gpu: Gpu, plugin: str = "xla_cuda12") -> str:
  """The GpuTargetConfigProto text for `gpu`: its spec plus the cuDNN and runtime versions."""
  major, minor = RUNTIME_VERSION[plugin]
  return (gpu.spec_text() + f"dnn_version_info {{ major: {DNN_VERSION[0]} minor: "
          f"{DNN_VERSION[1]} }}\nruntime_version {{ major: {major} minor: {minor} }}\n")


def devices(target: Target) -> list:
  """Compile-only devices of `target` (jax platform 'gpu'); nothing can run on them.

  The plugin's topology call needs JAX on the CPU platform (topology.choose_platform does it
  for --mode=compile): otherwise it initialises CUDA first, which fails without a driver and
  leaves "topology not implemented for cuda".
  """
  plugin = installed_plugin()
  if plugin is None:
    raise GpuTargetError(f"compile_topology={target.name!r}: {install_hint()}")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(
        target.gpu, plugin), topology=target.topology)
  except Exception as e:  # pylint: disable=broad-except
    raise GpuTargetError(f"the CUDA plugin refused target {target.name} (topology "
                         f"{target.topology}): {e}; run with JAX_PLATFORMS=cpu") from e
  return list(topo.devices)


@contextlib.contextmanager
def target_cudnn_checks(devices):
  """JAX's cuDNN attention checks, answered for the target's compute capability while tracing.

  jax._src.cudnn asks the default backend's first GPU for its compute capability; with
  compile-only devices that backend is the host's CPU, so every target looks pre-Hopper (head
  dim <= 128, no packed layouts). Here the checks read the target's devices instead; elsewhere
  (no GPU target, or a jax without these functions) nothing changes.
  """
  cc = getattr(devices[0], "compute_capability", None) if devices else None
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  except ImportError:
    fa = None
  names = ("check_compute_capability", "is_cuda_compute_capability_equal")
  if not cc or devices[0].platform != "gpu" or fa is None or not all(
      hasattr(fa, n) for n in names):
    yield
    return
  have = tuple(int(x) for x in str(cc).split("."))
  parse = lambda c: tuple(int(x) for x in c.split("."))
  saved = [getattr(fa, n) for n in names]
  fa.check_compute_capability = lambda c: have >= parse(c)
  fa.is_cuda_compute_capability_equal = lambda c: have == parse(c)
  try:
    yield
  finally:
    for n, f in zip(names, saved):
      setattr(fa, n, f)


@contextlib.contextmanager
def refused_by_cudnn(cfg, devices):
  """`target_cudnn_checks`, with JAX's refusal of the model's shapes (NotImplementedError) a
  GpuTargetError saying why, as a real GPU of that kind would refuse them at the first step."""
  try:
    with target_cudnn_checks(devices):
      yield
  except NotImplementedError as e:
    raise GpuTargetError(
        f"cuDNN attention refuses this model on {devices[0].device_kind} (compute capability "
        f"{getattr(devices[0], 'compute_capability', '?')}): {e} (d_k={cfg.d_k}); "
        f"--config.use_flash_attention=False compiles XLA attention instead") from None


# ------------------------------------------------------------------ reading the compiled step


def cudnn_attention_calls(hlo_text: str) -> list[str]:
  """The distinct cuDNN fused-attention custom calls in HLO text (forward, backward)."""
  return sorted(set(re.findall(r'custom_call_target="(' + re.escape(CUDNN_FMHA) + r'[^"]*)"',
                               hlo_text)))


def attention_verdict(cfg, impl: str, hlo_text: str) -> str:
  """One line: whether the compiled program uses cuDNN fused attention, and why not."""
  calls = cudnn_attention_calls(hlo_text)
  if calls:
    return f"cuDNN fused attention in the compiled HLO ({', '.join(calls)})"
  if impl == "cudnn":
    why = ("the model asked for cuDNN attention but the compiled HLO has none: attention "
           "dropout or a returned probability map runs XLA attention" if
           cfg.get("attention_dropout", 0.0) > 0 else
           "the model asked for cuDNN attention but the compiled HLO has none")
  elif not cfg.use_flash_attention:
    why = "use_flash_attention=False: XLA attention (--config.use_flash_attention=True for cuDNN)"
  elif cfg.dtype not in ("bfloat16", "float16"):
    why = f"dtype={cfg.dtype}: cuDNN attention needs bfloat16 or float16 (--config.dtype=bfloat16)"
  else:
    why = (f"d_k={cfg.d_k}, d_v={cfg.d_v}: cuDNN attention needs d_k == d_v, a multiple of 8, "
           f"<= 256")
  return f"no cuDNN fused attention: {why}"


def preopt_cost(lowered) -> dict:
  """XLA's generic cost analysis of `lowered` before optimisation, on the host's CPU client.

  The compile-only GPU executable has no cost analysis (UNIMPLEMENTED), so this counts the
  whole (global, unpartitioned) program as the front end emitted it: dots and elementwise ops
  are counted; custom calls (cuDNN attention) count zero, so the caller adds attention's FLOPs;
  a while loop's body counts once; 'bytes accessed' is of the unfused program, no HBM estimate.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
  return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
