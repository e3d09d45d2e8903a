"""--mode=compile for NVIDIA GPU targets (gpu_targets.py): names, the missing-plugin error, the
GPU compiler's combined collectives in HLO text, and the real train and decode steps compiled
for H100s from this CPU host through JAX's CUDA plugin (no GPU, no driver).

The compiles need the plugin (pip install -e ".[cuda]", about 5.5 GB): they are marked
`cuda_compile` and run by `make test-cuda-compile` in its own venv; in the default venv they
skip, saying so. Each compile happens once per process (cached), 10-40 s each on 2 cores.
"""

import functools
import os

import pytest

from llm_jax import config
from llm_jax import gpu_targets
from llm_jax import metrics
from llm_jax import sizing
from llm_jax import topology
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.py")
SMALL = os.path.join(ROOT, "configs", "small.py")
GIB = 1024**3
needs_plugin = pytest.mark.skipif(
    gpu_targets.installed_plugin() is None,
    reason="JAX's CUDA plugin is not installed (pip install -e '.[cuda]'; make test-cuda-compile)")
cuda_compile = [pytest.mark.cuda_compile, needs_plugin]


# ------------------------------------------------------------------ names (no plugin needed)


@pytest.mark.parametrize("name,kind,hosts,per_host,topo", [
    ("h100", "h100", 1, 1, "1x1x1"),
    ("H200", "h200", 1, 1, "1x1x1"),
    ("a100-80gb", "a100-80gb", 1, 1, "1x1x1"),
    ("8xh100", "h100", 1, 8, "1x1x8"),
    ("4xh200", "h200", 1, 4, "1x1x4"),
    ("2x8xh100", "h100", 2, 8, "1x2x8"),
])
def test_gpu_target_names(name, kind, hosts, per_host, topo):
  t = topology.parse_target(name)
  assert (t.gpu.name, t.hosts, t.per_host, t.topology) == (kind, hosts, per_host, topo)
  assert t.n_devices == hosts * per_host
  assert topology.parse_target(t.name) == t  # the canonical name parses back


def test_tpu_names_still_parse_as_slices():
  assert topology.parse_target("v5p-128").topology == "v5p:4x4x4"


def test_gpu_specs_hold_the_vendor_figures():
  # NVIDIA's data sheets: H100 SXM 80 GB at 3.35 TB/s, H200 SXM 141 GB at 4.8 TB/s, A100 SXM
  # 80 GB at 2.04 TB/s; the runtime sees a little less than the nominal size.
  gb = {n: (g.hbm_bytes / 1e9, g.hbm_bytes_per_s / 1e12) for n, g in gpu_targets.GPUS.items()}
  assert 84 < gb["h100"][0] < 86 and gb["h100"][1] == pytest.approx(3.35, abs=0.01)
  assert 140 < gb["h200"][0] < 152 and gb["h200"][1] == pytest.approx(4.8)
  assert 84 < gb["a100-80gb"][0] < 86 and gb["a100-80gb"][1] == pytest.approx(2.04, abs=0.01)
  # Same compute die: the H200 file differs from the H100's in memory size, bandwidth, name only.
  strip = lambda g: {ln for ln in g.spec_text().splitlines() if not ln.startswith("#")}
  diff = strip(gpu_targets.GPUS["h100"]) ^ strip(gpu_targets.GPUS["h200"])
  assert {ln.split(":")[0].strip() for ln in diff} == {
      "memory_bandwidth", "device_memory_size", "device_description_str"}
  for g in gpu_targets.GPUS.values():
    assert metrics.peak_flops_per_device(g.device_kind) in (989e12, 312e12)


@pytest.mark.parametrize("name,says", [
    ("h300", "h100, h200, a100-80gb"),  # a GPU-looking name: the GPU targets are listed
    ("a100", "a100-80gb"),
    ("16xh100", "2x8xh100"),  # more than a host holds: hosts x GPUs per host
    ("3xh100", "1/2/4/8"),
    ("gpu", "v5p-{8,16"),  # neither: both lists
])
def test_unknown_targets_are_refused_with_the_known_ones(name, says):
  with pytest.raises(config.ConfigError) as e:
    config.load(BASE, compile_topology=name)
  assert "compile_topology" in str(e.value) and name in str(e.value) and says in str(e.value)
  if name == "gpu":
    assert "8xh100" in str(e.value)


def test_missing_plugin_says_how_to_install(monkeypatch):
  monkeypatch.setattr(gpu_targets, "installed_plugin", lambda: None)
  with pytest.raises(gpu_targets.GpuTargetError) as e:
    gpu_targets.devices(topology.parse_target("h100"))
  assert '.[cuda]' in str(e.value) and "h100" in str(e.value)


def _report(device_kind, hbm, peak):
  return sizing.CompileReport(
      target="t", n_devices=1, device_kind=device_kind, mesh={}, attention_impl="cudnn",
      compile_s=0.0, memory={"arguments": peak, "outputs": 0, "aliased (donated, counted once)": 0,
                             "temporaries": 0, "generated code": 0},
      hbm_bytes=hbm, oom=None, flops_xla=None, flops_note="", flops_model=1.0,
      bytes_accessed=None, hbm_bytes_per_s=None, peak_flops=None, collectives={},
      tokens_per_step=1)


def test_a_gpu_program_fits_in_what_jax_can_have_of_the_memory():
  # JAX can be given at most 95% of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=.95): a compile-only
  # peak at 97% of the H100's HBM does not fit; on a TPU (its compiler enforces its own limit)
  # the whole HBM counts.
  h100 = gpu_targets.GPUS["h100"]
  hbm = h100.hbm_bytes
  assert _report(h100.device_kind, hbm, int(0.94 * hbm)).fits is True
  over = _report(h100.device_kind, hbm, int(0.97 * hbm))
  assert over.fits is False
  assert "95%" in sizing.format_report(config.load(BASE), over)
  assert _report("TPU v5", hbm, int(0.97 * hbm)).fits is True


def test_target_config_adds_the_versions_xla_needs():
  text = gpu_targets.target_config(gpu_targets.GPUS["h100"])
  assert "dnn_version_info { major: 9 minor: 8 }" in text
  assert "runtime_version { major: 12 minor: 9 }" in text
  assert 'platform_name: "CUDA"' in text and "cuda_compute_capability { major: 9 }" in text


# The GPU compiler combines collectives: one async start carrying many arrays, typed
# ((operands...), results...). Bytes: all-gather and all-reduce their results, reduce-scatter
# its (whole) operands.
_GPU_HLO = """HloModule m

ENTRY %main (a: f32[64]) -> f32[8] {
  %a = f32[64]{0} parameter(0)
  %ag = (f32[8]{0}, bf16[8,4]{1,0}) all-gather(%a, %b), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %rs = ((bf16[64,256]{1,0}, f32[64]{0}), (bf16[8,256]{1,0}, f32[8]{0})) reduce-scatter-start(%c, %d), channel_id=2, replica_groups=mesh['fsdp'=8] {'fsdp'}, dimensions={0}, to_apply=%add
  %rd = (bf16[8,256]{1,0}, f32[8]{0}) reduce-scatter-done(%rs)
  %ar = ((f32[55]{0}), f32[55]{0}) all-reduce-start(%e), channel_id=3, replica_groups=mesh['fsdp'=8] {'fsdp'}, to_apply=%add
  %ard = f32[55]{0} all-reduce-done(%ar)
  %gs = ((bf16[2,64]{1,0}, /*index=1*/bf16[64]{0}), (bf16[16,64]{1,0}, bf16[512]{0})) all-gather-start(%f, %g), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %gd = (bf16[16,64]{1,0}, bf16[512]{0}) all-gather-done(%gs)
}
"""


def test_combined_gpu_collectives_count_every_array():
  got = sizing.collectives(_GPU_HLO)
  assert got["all-gather"] == [2, (8 * 4 + 8 * 4 * 2) + (16 * 64 * 2 + 512 * 2)]
  assert got["reduce-scatter"] == [1, 64 * 256 * 2 + 64 * 4]
  assert got["all-reduce"] == [1, 55 * 4]


# The GPU compiler writes a loop's trip count on the while (its condition compares against a
# fused constant): the accumulation loop below runs its gather 5 times.
_GPU_LOOP_HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] fusion(%p), kind=kLoop, calls=%fused_compare
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[64]{0} all-gather(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
}
"""


def test_gpu_loops_count_collectives_per_known_trip():
  assert sizing.collectives(_GPU_LOOP_HLO)["all-gather"] == [5, 5 * 64 * 4]


# ------------------------------------------------------------- compiles (need the plugin)

TINY = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
            micro_batch_size=8, warmup_steps=0, dtype="bfloat16", use_flash_attention=True)
# ~9.7B parameters (3 blocks of d_model 16384): fp32 params and AdamW's two moments alone are
# ~108 GiB, more than one 80 GB H100 holds, and ~14 GiB each split 8 ways.
TOO_BIG = dict(vocab_size=256, d_model=16384, n_heads=128, d_ff=4 * 16384, n_layers=3,
               max_seq_len=128, micro_batch_size=8, warmup_steps=0, dtype="bfloat16",
               use_flash_attention=True)


@functools.lru_cache(maxsize=None)
def _compiled(path, target, **overrides):
  cfg = config.load(path, compile_topology=target, **overrides)
  return cfg, *sizing.compile_report(cfg)


@pytest.mark.cuda_compile
@needs_plugin
def test_124m_step_compiles_for_one_h100_with_cudnn_attention():
  cfg, r, compiled = _compiled(SMALL, "h100", mesh_shape=(1, 1, 1))
  assert r.device_kind == "NVIDIA H100 80GB HBM3" and r.n_devices == 1
  assert r.attention_impl == "cudnn"
  calls = gpu_targets.cudnn_attention_calls(compiled.as_text())
  assert "__cudnn$fmhaSoftmax" in calls and "__cudnn$fmhaSoftmaxBackward" in calls
  assert "cuDNN fused attention in the compiled HLO" in r.attention_note
  n = metrics.count_params(sizing.param_shapes(cfg))
  assert 120e6 < n < 130e6
  # fp32 params and AdamW's two moments, at least, are the step's arguments.
  assert r.memory["arguments"] >= 3 * 4 * n
  assert r.fits is True and r.peak_bytes < r.hbm_bytes == gpu_targets.GPUS["h100"].hbm_bytes
  # The pre-optimisation count (+ cuDNN attention) against 6N + attention: the same step.
  assert 0.85 < r.flops_model / r.flops_xla < 1.15
  text = sizing.format_report(cfg, r)
  assert "FITS" in text and "MFU" in text and "h100" in text


@pytest.mark.cuda_compile
@needs_plugin
def test_too_big_for_one_h100_is_reported_with_its_figures(capsys):
  cfg, r, _ = _compiled(BASE, "h100", mesh_shape=(1, 1, 1), **TOO_BIG)
  n = metrics.count_params(sizing.param_shapes(cfg))
  assert r.fits is False and r.memory["arguments"] >= 3 * 4 * n > r.hbm_bytes  # params, mu, nu
  text = sizing.format_report(cfg, r)
  assert "DOES NOT FIT in 79.14 GiB" in text and train.OOM_FIXES in text
  assert f"{r.peak_bytes / GIB:.3f} GiB" in text  # the figure it compared


@pytest.mark.cuda_compile
@needs_plugin
def test_the_same_model_fits_on_8_h100s_with_fsdp():
  cfg, one, _ = _compiled(BASE, "h100", mesh_shape=(1, 1, 1), **TOO_BIG)
  cfg8, r, _ = _compiled(BASE, "8xh100", mesh_shape=(1, -1, 1), **TOO_BIG)
  assert r.n_devices == 8 and r.mesh == {"data": 1, "fsdp": 8, "tensor": 1, "context": 1}
  assert r.fits is True
  # The state is split 8 ways; the gathered weights and gradients are reduce-scattered.
  assert r.memory["arguments"] == pytest.approx(one.memory["arguments"] / 8, rel=0.05)
  n = metrics.count_params(sizing.param_shapes(cfg8))
  assert r.collectives["all-gather"][1] >= 2 * n  # every weight gathered in bf16, at least once
  assert r.collectives["reduce-scatter"][0] >= 1
  assert "cuDNN fused attention" in r.attention_note


@pytest.mark.cuda_compile
@needs_plugin
def test_decode_compiles_for_one_h100():
  from llm_jax import decode_compile  # pylint: disable=g-import-not-at-top
  cfg = config.load(BASE, compile_topology="h100", compile_what="decode", max_new_tokens=64,
                    mesh_shape=(1, 1, 1), **TINY)
  r, _ = decode_compile.compile_decode(cfg)
  assert r.fits is True and r.device_kind == "NVIDIA H100 80GB HBM3"
  out = decode_compile.format_decode_report(cfg, r)
  assert "Decode" in out and "FITS" in out and "cuDNN fused attention in the compiled HLO" in out
  # The whole cache: [L, B, S, K, H] for k and v, bf16.
  assert r.cache_bytes == 2 * 2 * 8 * 128 * 4 * 16 * 2
  assert r.memory["arguments"] >= metrics.count_params(sizing.param_shapes(cfg)) * 4


@pytest.mark.cuda_compile
@needs_plugin
def test_head_dim_256_gets_cudnn_on_hopper_and_a_reason_on_ampere():
  # JAX's cuDNN checks ask the host backend (CPU here) for the compute capability, which would
  # make every target pre-Hopper (head dim <= 128); they are answered for the target instead.
  wide = dict(TINY, d_model=256, n_heads=1, mesh_shape=(1, 1, 1))
  cfg, r, compiled = _compiled(BASE, "h100", **wide)
  assert cfg.d_k == 256 and "__cudnn$fmhaSoftmax" in gpu_targets.cudnn_attention_calls(
      compiled.as_text())
  with pytest.raises(gpu_targets.GpuTargetError) as e:  # refused while tracing: no compile
    sizing.compile_report(config.load(BASE, compile_topology="a100-80gb", **wide))
  assert "A100" in str(e.value) and "128" in str(e.value) and "use_flash_attention" in str(e.value)
