"""Compiling for TPUs on this CPU host: ``cce_jax.aot.tpu``, ``cce_jax.target`` and
``python -m train.aot --topology``.

The tests marked ``tpu_aot`` run the real XLA:TPU compiler (Mosaic included) for TPU topologies
described by libtpu, and skip where libtpu is not installed (the default test venv). Run them
with ``pip install -e ".[test,train,tpu-aot]"`` and::

    JAX_PLATFORMS=cpu python -m pytest -q -m tpu_aot tests/test_tpu_aot.py [--runslow]

(about 1.5 minutes on 2 cores; ``--runslow`` adds the full-size train step of every TPU config
in configs/, 1-2 minutes each: 3.5 minutes in all.) The unmarked tests (topology names, the
platform the loss is compiled for, the backend check of a real CPU run, the command line's
errors, the benchmark's RESULTS.md section) need no libtpu.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing
import yaml

import cce_jax
from cce_jax import BlockSizes, target
from cce_jax.aot import tpu
from pallas_kernels.tpu import TPUBlockSizes
from pallas_kernels.tpu.block_sizes import resolve
from train import aot

needs_libtpu = pytest.mark.skipif(
  not tpu.has_libtpu(), reason=f"needs libtpu, the TPU compiler: {tpu.INSTALL_HINT}"
)
# One chip of each generation the Pallas TPU kernels claim.
ONE_CHIP = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}
# Mosaic kernels appear in the compiled TPU program as custom calls with this target.
MOSAIC_CALL = "tpu_custom_call"
MIB = 2**20
CONFIGS_DIR = train_testing.ROOT / "configs"


def _tpu_configs() -> list[str]:
  names = []
  for path in sorted(CONFIGS_DIR.glob("*.yaml")):
    chip = (yaml.safe_load(path.read_text()).get("hardware") or {}).get("chip")
    if chip in tpu.GENERATIONS:
      names.append(path.name)
  return names


# --- topology names (no libtpu needed) ---


@pytest.mark.parametrize(
  ("topology", "parsed"),
  [
    ("v5e:2x2", ("v5e", (2, 2))),
    ("v5p:2x2x4", ("v5p", (2, 2, 4))),
    ("v4:1x1x1", ("v4", (1, 1, 1))),
  ],
)
def test_parse_topology(topology, parsed):
  assert tpu.parse_topology(topology) == parsed


@pytest.mark.parametrize(
  ("topology", "message"),
  [
    ("v3:2x2", "generation of .*'v4', 'v5e', 'v5p', 'v6e'.*got 'v3:2x2'"),
    ("v5e-4", "GENERATION:SHAPE"),
    ("v5e:2x2x1", "a v5e slice has 2 dimensions"),
    ("v5p:2x2", "a v5p slice has 3 dimensions"),
    ("v5p:0x2x2", "GENERATION:SHAPE"),
  ],
)
def test_bad_topology_names_itself(topology, message):
  with pytest.raises(ValueError, match=message):
    tpu.parse_topology(topology)


@pytest.mark.parametrize(
  ("chip", "chips", "topology"),
  [
    ("v5p", 1, "v5p:1x1x1"),
    ("v5p", 4, "v5p:2x2x1"),
    ("v5p", 16, "v5p:2x2x4"),  # v5p-32
    ("v5p", 128, "v5p:4x4x8"),  # v5p-256
    ("v4", 32, "v4:2x4x4"),
    ("v5e", 1, "v5e:1x1"),
    ("v5e", 8, "v5e:2x4"),
    ("v6e", 32, "v6e:4x8"),
    ("v6e", 256, "v6e:16x16"),
  ],
)
def test_default_topology_has_cloud_tpu_shapes(chip, chips, topology):
  assert tpu.default_topology(chip, chips) == topology
  generation, shape = tpu.parse_topology(topology)
  assert generation == chip and np.prod(shape) == chips


@pytest.mark.parametrize(("chip", "chips"), [("v5p", 3), ("v5e", 2), ("v5e", 12), ("h100", 8)])
def test_default_topology_refuses_what_has_no_slice(chip, chips):
  with pytest.raises(ValueError, match=rf"{chip}|{chips}"):
    tpu.default_topology(chip, chips)


def test_tpu_devices_without_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(tpu, "has_libtpu", lambda: False)
  with pytest.raises(ModuleNotFoundError, match=re.escape('pip install -e ".[tpu-aot]"')):
    tpu.tpu_devices("v5e:2x2")


class _Compiled:
  """A stand-in for ``jax.stages.Compiled`` with given analyses."""

  def __init__(self, costs, hlo="ENTRY %main { ROOT %x = f32[] parameter(0) }"):
    self.costs, self.hlo = costs, hlo

  def as_text(self):
    return self.hlo

  def cost_analysis(self):
    return self.costs

  def memory_analysis(self):
    return None


@pytest.mark.parametrize(
  "costs",
  [
    {"flops": 6.0, "bytes accessed": 8.0, "optimal_seconds": 0.5},
    [
      {"flops": 2.0, "bytes accessed": 3.0, "optimal_seconds": 0.25},
      {"flops": 4.0, "bytes accessed": 5.0, "optimal_seconds": 0.25},
    ],
  ],
  ids=["dict", "list"],
)
def test_compile_report_reads_both_shapes_of_cost_analysis(costs):
  report = tpu.compile_report(_Compiled(costs))
  assert (report.flops, report.bytes_accessed, report.estimated_seconds) == (6.0, 8.0, 0.5)


def test_compile_report_drops_a_negative_time_estimate():
  """XLA:TPU answers a negative ``optimal_seconds`` for programs it cannot cost."""
  report = tpu.compile_report(_Compiled({"flops": 1.0, "optimal_seconds": -0.99}))
  assert report.estimated_seconds is None and report.flops == 1.0


def test_compile_report_gives_no_estimate_for_a_program_that_loops():
  """Its estimate would be of one iteration of each loop."""
  hlo = "ENTRY %main { %w = (s32[]) while(%t), condition=%c, body=%b }"
  report = tpu.compile_report(_Compiled({"flops": 1.0, "optimal_seconds": 0.5}, hlo))
  assert report.estimated_seconds is None and tpu.has_loops(_Compiled({}, hlo))


# --- the platform the loss is compiled for (no libtpu needed) ---


def _abstract_tpu_mesh(kind: str = "TPU v5 lite") -> jax.sharding.AbstractMesh:
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def _abstract_inputs(dtype=jnp.bfloat16, tokens=200, hidden=72, classes=333):
  return (
    jax.ShapeDtypeStruct((tokens, hidden), dtype),
    jax.ShapeDtypeStruct((classes, hidden), dtype),
    jax.ShapeDtypeStruct((tokens,), jnp.int32),
  )


def _loss_and_grad(impl: str, **options):
  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(e, c, labels, impl=impl, **options)

  return jax.value_and_grad(loss, argnums=(0, 1))


def test_target_follows_the_mesh_in_context():
  assert target.platform() == jax.default_backend() and target.device_kind() is None
  with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):
    assert target.platform() == "tpu" and target.device_kind() == "TPU v5 lite"
    # The xla implementation's default tiles are the TPU's, not the host's.
    assert BlockSizes.get_default(jnp.bfloat16) == BlockSizes.get_default(
      jnp.bfloat16, backend="tpu"
    )
  assert target.platform(_abstract_tpu_mesh()) == "tpu"


def test_pallas_tpu_default_tiles_follow_the_chip():
  """v5e and v6e (128 MiB of VMEM) plan for 96 MiB with 2048-class vocabulary blocks; other
  chips, and the CPU host, keep the heuristic's default budget."""
  large = TPUBlockSizes(vmem_budget_bytes=96 * 2**20)
  for kind in ("TPU v5 lite", "TPU v6 lite", "TPU v5e", "TPU v6e"):
    assert TPUBlockSizes.get_default(jnp.bfloat16, device_kind=kind) == large
  for kind in ("TPU v4", "TPU v5", "TPU v5p", "cpu"):
    assert TPUBlockSizes.get_default(jnp.bfloat16, device_kind=kind) == TPUBlockSizes()
  assert TPUBlockSizes.get_default(jnp.bfloat16) == TPUBlockSizes()  # this CPU host
  with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):  # a v5e compile target
    assert TPUBlockSizes.get_default(jnp.bfloat16) == large
  # 2048-class vocabulary blocks where they fit (clamped to a small V), smaller at a wide D.
  for n, d, v, vocab_block in (
    (8192, 2304, 256000, 2048),
    (8192, 4096, 128256, 2048),
    (100, 256, 1000, 1000),
    (8192, 16384, 128256, 512),
  ):
    assert resolve(large, n, d, v, jnp.bfloat16).vocab_block == vocab_block, (n, d, v)
  assert resolve(TPUBlockSizes(), 8192, 2304, 256000, jnp.bfloat16).vocab_block == 512


def test_pallas_tpu_traces_for_a_tpu_mesh_on_a_cpu_host():
  """Traced (not lowered: that needs libtpu) under a TPU mesh, the up-front backend check lets
  ``impl="pallas_tpu"`` through and its three kernels are in the program."""
  with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):
    traced = jax.jit(_loss_and_grad("pallas_tpu")).trace(*_abstract_inputs())
  assert str(traced.jaxpr).count("pallas_call") >= 2


@pytest.mark.parametrize("kind", ["TPU v2", "TPU v3"])
def test_pallas_tpu_refuses_a_generation_it_cannot_compile_for(kind):
  """Mosaic cannot compile the kernels' matrix products there (see the libtpu test below):
  a clear error up front instead of a MosaicError from deep in the compiler."""
  with (
    jax.sharding.use_abstract_mesh(_abstract_tpu_mesh(kind)),
    pytest.raises(ValueError, match=rf"cannot compile its kernels for '{kind}' devices"),
  ):
    jax.jit(_loss_and_grad("pallas_tpu")).trace(*_abstract_inputs())


@pytest.mark.parametrize("kind", ["TPU v4", "TPU v5", "TPU v6 lite"])
def test_pallas_tpu_accepts_the_generations_it_claims(kind):
  with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh(kind)):
    jax.jit(_loss_and_grad("pallas_tpu")).trace(*_abstract_inputs())


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="this host is a TPU")
def test_pallas_tpu_still_refused_on_a_real_cpu_run():
  """The check that stops a compiled Pallas TPU kernel on CPU still fires, for a real run with
  no mesh and under a mesh of this host's CPU devices."""
  e = jax.random.normal(jax.random.key(0), (40, 16))
  c = jax.random.normal(jax.random.key(1), (70, 16))
  labels = jax.random.randint(jax.random.key(2), (40,), 0, 70)
  with pytest.raises(ValueError, match=r"default backend is 'cpu'.*jax\.set_mesh"):
    cce_jax.linear_cross_entropy(e, c, labels, impl="pallas_tpu")
  with (
    jax.set_mesh(jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])),
    pytest.raises(ValueError, match="the mesh in context compiles for 'cpu' devices"),
  ):
    jax.jit(_loss_and_grad("pallas_tpu"))(e, c, labels)


# --- train.aot --topology: the command line's errors (no libtpu needed) ---


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["configs/gemma2_2b.yaml", "--topology"], "--topology needs a value: hardware.chip is 'h100'"),
    (["configs/default.yaml", "--topology", "v9:2x2"], "--topology: topology must be"),
    (["configs/llama3_8b_v5p32.yaml", "hardware.chips=12", "--topology"], "hardware.chips: no"),
    (
      ["configs/default.yaml", "--topology", "v5e:2x2", "--gpu", "h100"],
      "--gpu and --topology name two targets",
    ),
  ],
)
def test_aot_topology_errors_are_one_line_and_status_2(args, message, capsys, monkeypatch):
  monkeypatch.chdir(train_testing.ROOT)
  assert aot.main(args) == aot.EXIT_BAD_CONFIG
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_aot_topology_without_libtpu_names_the_install(capsys, monkeypatch):
  monkeypatch.chdir(train_testing.ROOT)
  monkeypatch.setattr(tpu, "has_libtpu", lambda: False)
  assert aot.main(["configs/llama3_8b_v5p32.yaml", "--topology"]) == aot.EXIT_BAD_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.startswith("--topology v5p:2x2x4:") and '".[tpu-aot]"' in err
  assert len(err.splitlines()) == 1


def test_aot_topology_excludes_devices(capsys):
  with pytest.raises(SystemExit) as exit_info:
    aot.main(["configs/default.yaml", "--topology", "v5e:2x2", "--devices", "4"])
  assert exit_info.value.code == aot.EXIT_BAD_CONFIG
  assert "not allowed with argument --topology" in capsys.readouterr().err


# --- the real TPU compiler (libtpu) ---

P = jax.sharding.PartitionSpec


def _compile(fn, args, mesh: jax.sharding.Mesh):
  placed = [
    jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, P()))
    for a in args
  ]
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*placed).compile()


def _variant(name: str) -> tuple[jnp.dtype, dict, bool]:
  """(dtype, loss options, with a bias) of a kernel variant. Between them they take every code
  path of the kernels: softcap and bias, label smoothing and z-loss, filtering on and off, one
  and several hidden chunks, both classifier layouts."""
  from pallas_kernels.tpu import TPUBlockSizes

  if name == "bf16-softcap-bias":
    return jnp.bfloat16, {"softcap": 30.0, "label_smoothing": 0.1}, True
  if name == "bf16-grouped-sort-chunked":  # c read by groups of 16 rows (V = 1504), D in chunks
    options = {"label_smoothing": 0.1, "block_sizes": TPUBlockSizes(hidden_block=256)}
    return jnp.bfloat16, options, True
  chunked = TPUBlockSizes(hidden_block=128)  # D = 640: five hidden chunks
  options = {"filter_eps": None, "z_loss": 1e-4, "classifier_layout": "dv"}
  return jnp.float32, {**options, "block_sizes": chunked}, False


VARIANTS = ("bf16-softcap-bias", "f32-exact-dv-chunked", "bf16-grouped-sort-chunked")


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("generation", sorted(ONE_CHIP))
def test_every_pallas_tpu_kernel_compiles_on_every_generation(generation, variant):
  """Forward and loss+grad for one chip of every generation, at sizes that are not multiples
  of the blocks: Mosaic kernels in both programs, more of them with the gradient, and the TPU
  compiler's flop count for them."""
  dtype, options, with_bias = _variant(variant)
  # V = 1504 is a whole number of 16-row groups: the grouped sort's DMA reads and writes.
  hidden, classes, tokens = 640, 1504 if "grouped" in variant else 1500, 1000
  mesh = jax.make_mesh((1,), ("x",), devices=tpu.tpu_devices(ONE_CHIP[generation]))
  e_shape = (tokens, hidden)
  c_shape = (hidden, classes) if options.get("classifier_layout") == "dv" else (classes, hidden)
  args = [
    jax.ShapeDtypeStruct(e_shape, dtype),
    jax.ShapeDtypeStruct(c_shape, dtype),
    jax.ShapeDtypeStruct((tokens,), jnp.int32),
  ]
  if with_bias:
    args.append(jax.ShapeDtypeStruct((classes,), jnp.float32))

  def loss(e, c, labels, bias=None):
    return cce_jax.linear_cross_entropy(e, c, labels, bias=bias, impl="pallas_tpu", **options)

  forward = _compile(loss, args, mesh)
  both = _compile(jax.value_and_grad(loss, argnums=(0, 1)), args, mesh)
  forward_calls = forward.as_text().count(MOSAIC_CALL)
  backward_calls = both.as_text().count(MOSAIC_CALL)
  assert forward_calls >= 1, f"no Mosaic kernel in the {generation} forward"
  assert backward_calls > forward_calls, f"no Mosaic backward kernel on {generation}"
  report = tpu.compile_report(both)
  assert report.flops is not None and report.flops > 2 * tokens * hidden * classes


@pytest.mark.tpu_aot
@needs_libtpu
def test_v3_really_cannot_compile_the_kernels(monkeypatch):
  """Why ``pallas_tpu`` refuses TPU v2/v3: without the up-front check, Mosaic fails there."""
  from jax.experimental import topologies

  import pallas_kernels.tpu

  unchecked = dataclasses.replace(pallas_kernels.tpu.IMPLEMENTATION, unsupported_kinds=())
  monkeypatch.setattr(pallas_kernels.tpu, "IMPLEMENTATION", unchecked)
  tpu.tpu_devices("v5e:2x2")  # libtpu loaded as the module does it
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v3:2x2").devices
  mesh = jax.make_mesh((1,), ("x",), devices=devices[:1])
  loss = _loss_and_grad("pallas_tpu")
  with pytest.raises(Exception, match="Mosaic"):
    _compile(lambda e, c, labels: loss(e, c, labels)[0], _abstract_inputs(), mesh)


# The paper's shape: Gemma 2 (2B)'s vocabulary and hidden size, 8192 tokens, bfloat16.
PAPER = (8192, 2304, 256000)


def temp_bound_bytes(tokens: int, hidden: int, classes: int) -> int:
  """What loss+grad may hold besides its inputs and outputs without materializing logits: one
  float32 copy of ``e`` and of ``c`` (gradient accumulators), plus 64 MiB of tiles. The
  materialized logits alone (N x V, even bfloat16) are larger at the paper's shape."""
  return 4 * (tokens + classes) * hidden + 64 * MIB


def _materialized_loss(e, c, labels):
  """The mean cross-entropy of the materialized float32 logits (what CCE replaces)."""
  logits = (e @ c.T).astype(jnp.float32)
  return jnp.mean(
    jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  )


def _full_shape_report(impl: str) -> tpu.CompileReport:
  tokens, hidden, classes = PAPER
  mesh = jax.make_mesh((1,), ("x",), devices=tpu.tpu_devices("v5e:1x1"))
  args = _abstract_inputs(jnp.bfloat16, tokens, hidden, classes)
  if impl == "baseline":
    fn = jax.value_and_grad(_materialized_loss, argnums=(0, 1))
  else:
    fn = _loss_and_grad(impl)
  compiled = _compile(fn, args, mesh)
  return tpu.compile_report(compiled)


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_full_shape_temp_memory_stays_within_its_bound(impl):
  """Loss+grad at the paper's shape on one v5e chip: the TPU compiler's temporaries stay under
  :func:`temp_bound_bytes`, far below the N x V logits."""
  report = _full_shape_report(impl)
  tokens, _, classes = PAPER
  assert report.temp_bytes is not None
  assert report.temp_bytes <= temp_bound_bytes(*PAPER), (
    f"{impl}: {report.temp_bytes / MIB:.0f} MiB > bound {temp_bound_bytes(*PAPER) / MIB:.0f} MiB"
  )
  assert report.temp_bytes < tokens * classes * 2  # not even bfloat16 logits


@pytest.mark.tpu_aot
@needs_libtpu
def test_the_memory_bound_fails_the_materialized_baseline():
  """The bound can fail: the baseline's logits do not fit under it."""
  report = _full_shape_report("baseline")
  assert report.temp_bytes > temp_bound_bytes(*PAPER)


@pytest.mark.tpu_aot
@needs_libtpu
def test_vocab_parallel_pallas_tpu_compiles_over_four_chips():
  """Tokens over one axis and the vocabulary over the other of a v5e:2x2 mesh: the sharded
  loss+grad compiles with the Mosaic kernels inside shard_map."""
  mesh = tpu.make_mesh("v5e:2x2", (2, 2), ("data", "tensor"))
  tokens, hidden, classes = 1000, 256, 2000
  specs = {"e": P("data"), "c": P("tensor"), "labels": P("data")}
  args = [
    jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, specs[name]))
    for name, shape, dtype in (
      ("e", (tokens, hidden), jnp.bfloat16),
      ("c", (classes, hidden), jnp.bfloat16),
      ("labels", (tokens,), jnp.int32),
    )
  ]

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl="pallas_tpu", mesh=mesh, token_axes="data", vocab_axis="tensor"
    )

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  assert compiled.as_text().count(MOSAIC_CALL) >= 2
  # Per device: a quarter of c's gradient (f32 or bf16), never the whole of it.
  report = tpu.compile_report(compiled)
  assert report.output_bytes < classes * hidden * 2


@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("config", _tpu_configs())
def test_every_tpu_config_has_a_mesh_on_its_slice(config):
  """The trainer's mesh over the slice's devices, laid on the physical torus (v5p-256:
  data 2 x fsdp 16 x tensor 4 on 4x4x8 needs a physical axis split; jax.make_mesh refused)."""
  from train import config as config_lib
  from train.sharding import make_mesh

  cfg = config_lib.load(str(CONFIGS_DIR / config), [])
  devices = tpu.tpu_devices(tpu.default_topology(cfg.hardware.chip, cfg.hardware.chips))
  mesh = make_mesh(cfg.mesh, devices)
  assert mesh.devices.size == cfg.hardware.chips
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@pytest.mark.tpu_aot
@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("config", _tpu_configs())
def test_every_tpu_config_fits_its_slice_on_the_tpu_compiler(config):
  """``python -m train.aot CONFIG --topology``: the config's full-size train step compiled for
  its own slice (from its hardware section) by the TPU compiler, and its peak within HBM."""
  run = subprocess.run(
    [sys.executable, "-m", "train.aot", f"configs/{config}", "--topology"],
    cwd=train_testing.ROOT,
    env=train_testing.subprocess_env(JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=3600,
  )
  assert run.returncode == 0, run.stderr[-3000:] + run.stdout
  assert "TPU compiler" in run.stdout and f"{config}: fits: peak" in run.stdout


# --- benchmarks/tpu_aot.py's output (no libtpu needed) ---


def _benchmark_module(monkeypatch):
  monkeypatch.syspath_prepend(str(train_testing.ROOT / "benchmarks"))
  import tpu_aot

  return tpu_aot


def _row(impl: str, has_loops: bool) -> dict:
  return {
    "generation": "v5e",
    "impl": impl,
    "mode": "loss+grad",
    "dtype": "bf16",
    "softcap": "off",
    "shape": "paper",
    "layout": "single",
    "topology": "v5e:1x1",
    "temp_bytes": 3 * MIB,
    "peak_bytes": 5 * MIB,
    "flops": 4.8e13,
    "bytes_accessed": 1.25e11,
    "estimated_seconds": 0.2855,
    "has_loops": has_loops,
  }


def test_benchmark_rewrites_only_its_own_results_section(tmp_path, monkeypatch):
  bench = _benchmark_module(monkeypatch)
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\nearlier text\n")
  rows = [_row("pallas_tpu", False), _row("xla", True)]
  made = {"date": "2026-11-29", "jax": "0.10.2", "libtpu": "0.0.42.1"}
  bench.rewrite_results(results, bench.section(rows, ["cmd one"], made))
  first = results.read_text()
  bench.rewrite_results(results, bench.section(rows[:1], ["cmd two"], made))
  second = results.read_text()
  assert first.startswith("# Results\n\nearlier text\n\n" + bench.BEGIN)
  assert second.count(bench.BEGIN) == 1 and second.count(bench.END) == 1
  assert "cmd two" in second and "cmd one" not in second and "earlier text" in second
  assert "TPU compiler estimates (not runs)" in second
  # The estimate of a program that loops is not shown; flops and bytes are marked.
  assert "| 285.5 ms |" in first and "48.00 T (1 iter.)" in first and "| (loops) |" in first


def test_benchmark_render_reads_json_files(tmp_path, monkeypatch, capsys):
  bench = _benchmark_module(monkeypatch)
  saved = tmp_path / "rows.json"
  made = {"date": "2026-11-29", "jax": "0.10.2", "libtpu": "0.0.42.1"}
  saved.write_text(json.dumps({"command": "cmd", **made, "rows": [_row("pallas_tpu", False)]}))
  assert bench.main(["--render", str(saved)]) == 0
  assert "| v5e | v5e:1x1 | pallas_tpu | loss+grad |" in capsys.readouterr().out
  assert bench.main(["--render", str(tmp_path / "missing.json")]) == 2
  assert "--render" in capsys.readouterr().err
