"""--mode=compile: TPU slice names, the collectives read from compiled HLO, and the real train step
compiled for TPU topologies from this CPU host (libtpu's compile-only devices).

The compiles dominate this module's time: a 2-layer d_model 64 model, each compiled once, shared
between tests through module fixtures.
"""

import functools
import importlib.util
import os
import pickle

import pytest

from llm_jax import config
from llm_jax import metrics
from llm_jax import sizing
from llm_jax import topology
from llm_jax import train

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "base.py")
TINY = dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=32, micro_batch_size=8,
            warmup_steps=0, compile_topology="v5e:2x2")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def _cfg(**overrides):
  return config.load(BASE_CONFIG, **{**TINY, **overrides})


# ------------------------------------------------------------------------- names (no compile)


@pytest.mark.parametrize("name,topo,chips", [
    ("v5p-128", "v5p:4x4x4", 64),  # v5p names count TensorCores, 2 per chip
    ("v4-32", "v4:2x2x4", 16),
    ("v4-8", "v4:2x2x1", 4),
    ("v5e-256", "v5e:16x16", 256),  # v5e and v6e names count chips
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-256", "v6e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8),
    ("v5p:4x4x8", "v5p:4x4x8", 128),
    ("v5:2x2x1", "v5p:2x2x1", 4),  # libtpu's alias for v5p
    ("v6e:4x4", "v6e:4x4", 16),
])
def test_slice_names_map_to_topologies_and_chips(name, topo, chips):
  sl = topology.parse(name)
  assert (sl.topology, sl.chips) == (topo, chips)
  per_name_unit = 2 if sl.gen.name in ("v4", "v5p") else 1
  assert sl.cloud_name == f"{sl.gen.cloud_names[0]}-{chips * per_name_unit}"


@pytest.mark.parametrize("name,says", [
    ("v7-8", "v5p-{8,16,32"),  # unknown generation: the known names are listed
    ("tpu", "v6e-{1,4,8"),
    ("v5p-100", "v5p-128"),  # not a mapped size: the sizes and the topology form
    ("v5p-9", "2 per chip"),
    ("v5p:4x4", "3 dimensions"),
])
def test_unknown_slice_names_are_refused_with_the_known_ones(name, says):
  with pytest.raises(config.ConfigError) as e:
    _cfg(compile_topology=name)
  assert "compile_topology" in str(e.value) and name in str(e.value) and says in str(e.value)


def test_hbm_and_peak_per_generation():
  # Google Cloud's per-chip HBM; the peaks are the ones MFU is measured against.
  gib = 1024**3
  assert {n: g.hbm_bytes // gib for n, g in topology.GENERATIONS.items()} == {
      "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
  for g in topology.GENERATIONS.values():
    assert g.peak_bf16_flops == metrics.peak_flops_per_device(g.device_kind) > 0


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(topology, "_has_libtpu", lambda: False)
  with pytest.raises(topology.TopologyError) as e:
    topology.devices(topology.parse("v5e:2x2"))
  assert '.[tpu]' in str(e.value) and "libtpu==" in str(e.value)


# ------------------------------------------------------------------ collectives in HLO text

_HLO = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0:T(256)} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[8]{0} reduce-scatter(%ag), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %rs)
}

%all-reduce-scatter.1 (input: f32[16]) -> f32[4] {
  %input = f32[16]{0} parameter(0)
  %all-reduce.1 = f32[16]{0} all-reduce(%input), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[4]{0} dynamic-slice(%all-reduce.1, %o), dynamic_slice_sizes={4}
}

%start_clone (q: f32[4]) -> f32[16] {
  %q = f32[4]{0} parameter(0)
  ROOT %all-gather.8 = f32[16]{0} all-gather(%q), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}
}

%done_clone (q: f32[4]) -> f32[16] {
  %q = f32[4]{0} parameter(0)
  ROOT %all-gather.9 = f32[16]{0} all-gather(%q), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, metadata={op_name="scan"}
  %f = f32[4]{0} fusion(%b), kind=kCustom, calls=%all-reduce-scatter.1
  %s1 = f32[16]{0} fusion(%c), kind=kCustom, calls=%start_clone
  %s2 = f32[16]{0} fusion(%s1), kind=kCustom, calls=%done_clone
  %start = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(%c), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  %done = bf16[8,4]{1,0} all-gather-done(%start)
  %ar = (f32[8]{0}, f32[]) all-reduce(%a, %z), channel_id=5, replica_groups={{0,1}}, to_apply=%add
  %cp = f32[8]{0} collective-permute(%a), channel_id=6, source_target_pairs={{0,1}}
  ROOT %a2a = f32[8]{0} all-to-all(%a), channel_id=7, replica_groups=mesh['data'=2,'fsdp'=2] {'fsdp'}, dimensions={0}
}
"""


def test_collectives_counted_per_execution_with_whole_buffer_bytes():
  got = sizing.collectives(_HLO)
  assert got == {
      # 5 loop iterations of f32[32] (128 B); the async start's gathered bf16[8,4] (64 B); the
      # start/done clones of channel 8 once (f32[16], 64 B).
      "all-gather": [5 + 1 + 1, 5 * 128 + 64 + 64],
      # 5 iterations of a f32[8] result over 4 devices (its input, 128 B); the TPU all-reduce-
      # scatter fusion's f32[16] input (64 B).
      "reduce-scatter": [5 + 1, 5 * 128 + 64],
      "all-reduce": [1, 8 * 4 + 4],
      "all-to-all": [1, 32],
      "collective-permute": [1, 32],
  }


# ---------------------------------------------------------- compiles for TPU topologies


@functools.lru_cache(maxsize=None)
def _v5e_2x2():
  return topology.devices(topology.parse("v5e:2x2"))


@pytest.fixture
def v5e_2x2():
  return _v5e_2x2()


def _compile(devices, **overrides):
  cfg = _cfg(**overrides)
  return cfg, *sizing.compile_report(cfg, devices)


@functools.lru_cache(maxsize=None)
def _fsdp_compiles():
  """FSDP over 4 chips with the TPU's Pallas attention (T a multiple of its 128 block).

  Micro-batches of 64 and 128 rows (2k and 4k tokens per chip), so that activations, not the
  compiler's fixed buffers, dominate the temporaries (at 512 tokens per chip they stay ~11 MiB
  whatever the batch). Cached per process, not a module fixture: xdist may interleave other
  modules' tests, and pytest tears a module fixture down between them.
  """
  kw = dict(mesh_shape=(1, -1, 1), max_seq_len=128, dtype="bfloat16", use_flash_attention=True)
  return {mb: _compile(_v5e_2x2(), micro_batch_size=mb, **kw) for mb in (64, 128)}


@pytest.fixture
def fsdp():
  return _fsdp_compiles()


def _n_params(cfg):
  return metrics.count_params(sizing.param_shapes(cfg))


@needs_libtpu
def test_fsdp_step_compiles_for_v5e_with_pallas_attention_and_fits(fsdp):
  cfg, r, compiled = fsdp[64]
  assert compiled is not None and r.n_devices == 4 and r.device_kind == "TPU v5 lite"
  assert r.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1}
  assert r.attention_impl == "pallas"  # the TPU's kernel, not the host CPU's XLA attention
  assert r.fits is True and r.hbm_bytes == 16 * 1024**3
  # Params and AdamW's two moments, fp32, split over 4 chips (TPU tiles pad small arrays).
  assert r.memory["arguments"] >= 3 * 4 * _n_params(cfg) / 4
  assert r.memory["aliased (donated, counted once)"] > 0  # the state is donated
  text = sizing.format_report(cfg, r)
  assert "FITS" in text and "v5e:2x2" in text and "DOES NOT FIT" not in text


@needs_libtpu
def test_fsdp_gathers_weights_and_reduce_scatters_gradients(fsdp):
  cfg, r, _ = fsdp[64]
  n = _n_params(cfg)
  count, nbytes = r.collectives["all-gather"]
  assert count >= 2 * cfg.n_layers and nbytes >= 2 * n  # every block's weights, bf16, at least once
  # The gradients are reduce-scattered (the TPU compiler splits some into collective-permutes),
  # never all-reduced whole: what is all-reduced is the loss and norms, far less than them.
  assert r.collectives["reduce-scatter"][0] >= 1
  assert r.collectives["all-reduce"][1] < n


@needs_libtpu
def test_doubling_the_micro_batch_doubles_temporaries_and_flops(fsdp):
  (_, r1, _), (_, r2, _) = fsdp[64], fsdp[128]
  # XLA's buffer choices are not exactly linear in the batch (2.4x here, measured with
  # libtpu 0.0.50.1), but the activations it keeps for the backward pass dominate.
  assert 1.5 < r2.memory["temporaries"] / r1.memory["temporaries"] < 3.0
  assert 1.9 < r2.flops_xla / r1.flops_xla < 2.1
  assert r2.flops_model == pytest.approx(2 * r1.flops_model)


@needs_libtpu
def test_data_parallel_all_reduces_the_gradients(v5e_2x2):
  cfg, r, _ = _compile(v5e_2x2, mesh_shape=(-1, 1, 1), n_layers=1)  # 1 layer: a cheaper compile
  assert r.mesh == {"data": 4, "fsdp": 1, "tensor": 1, "context": 1}
  count, nbytes = r.collectives["all-reduce"]
  assert count >= 1 and nbytes >= 4 * _n_params(cfg)  # fp32 gradients, whole on every chip
  assert r.collectives["all-gather"][0] == r.collectives["reduce-scatter"][0] == 0
  # XLA's count of the step (one loop-free program, XLA attention) and 6N + attention agree.
  assert 0.7 < r.flops_model / r.flops_xla < 1.3


@needs_libtpu
def test_two_slices_over_dcn_compile_as_one_mesh():
  cfg = _cfg(mesh_shape=(-1, 1, 1), dcn_mesh_shape=(2, 1, 1), n_layers=1)
  devices, sl = sizing.target_devices(cfg)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  r, _ = sizing.compile_report(cfg, devices)
  assert r.mesh == {"data": 8, "fsdp": 1, "tensor": 1, "context": 1} and "x2 slices" in r.target
  # The gradients are reduced inside each slice and across the two.
  assert r.collectives["all-reduce"][0] >= 1 and sl.topology == "v5e:2x2"


@needs_libtpu
def test_too_big_for_the_chip_does_not_fit_with_exit_code_3(capsys):
  # ~3.2B fp32 params and two Adam moments: ~38 GiB on one 16 GiB v5e chip.
  cfg = _cfg(d_model=16384, n_heads=8, n_layers=1, micro_batch_size=1, mesh_shape=(1, 1, 1),
             compile_topology="v5e-1")
  assert sizing.run_compile(cfg) == sizing.EXIT_DOES_NOT_FIT == 3
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and train.OOM_FIXES in out and "FITS" not in out.replace(
      "DOES NOT FIT", "")


@needs_libtpu
def test_compiled_step_is_saved_with_its_versions(fsdp, tmp_path):
  _, r, compiled = fsdp[64]
  path = tmp_path / "step.pkl"
  sizing.save_executable(compiled, str(path), r.target)
  with open(path, "rb") as f:
    saved = pickle.load(f)
  assert saved["versions"]["jax"] and saved["versions"]["libtpu"] and saved["target"] == r.target
  assert len(saved["executable"]) > 1000
