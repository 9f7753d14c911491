"""Per-backend default tiles (the model of docs/tiling_model.md), the tuned table
(cce_jax/tuned.json) and ``benchmarks/accelerator.py --smoke``."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax.numpy as jnp
import pytest

import cce_jax
from cce_jax import BlockSizes, dispatch, tuned

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402
import tiling_model  # noqa: E402

PAPER = (8192, 2304, 256000)
LLAMA3 = (8192, 4096, 128256)


def _tiles(shape, sizes: BlockSizes) -> int:
  n, _, v = shape
  return math.ceil(n / sizes.token_block) * math.ceil(v / sizes.vocab_block)


@pytest.mark.parametrize(
  ("backend", "paper_tiles", "llama3_tiles"),
  [("cpu", 16000, 8032), ("gpu", 256, 128), ("cuda", 256, 128), ("tpu", 1000, 504)],
)
def test_bf16_default_tile_counts(backend, paper_tiles, llama3_tiles):
  sizes = BlockSizes.get_default(jnp.bfloat16, backend=backend)
  assert (_tiles(PAPER, sizes), _tiles(LLAMA3, sizes)) == (paper_tiles, llama3_tiles)
  if backend != "cpu":  # the bound: 1/16 of the CPU's tiles at the paper's shape
    assert _tiles(PAPER, sizes) <= 16000 // 16


def test_cpu_defaults_unchanged_and_default_backend_is_cpu_here():
  assert BlockSizes.get_default(jnp.bfloat16) == BlockSizes(token_block=256, vocab_block=512)
  assert BlockSizes.get_default(jnp.float32) == BlockSizes(token_block=1024, vocab_block=2048)
  assert BlockSizes.get_default(None, backend="cpu") == BlockSizes()


def test_defaults_are_the_models_picks():
  record = json.loads((ROOT / "benchmarks" / "tiling_model.json").read_text())
  shapes = {name: tuple(shape) for name, shape in record["shapes"].items()}
  assert shapes == tiling_model.SHAPES
  for dtype, per_shape in record["skipped"].items():
    skipped = {
      name: {tuple(int(x) for x in key.split("x")): val for key, val in per_tile.items()}
      for name, per_tile in per_shape.items()
    }
    for backend in ("gpu", "tpu"):
      picked = tiling_model.pick(backend, shapes, skipped, dtype)
      default = BlockSizes.get_default(jnp.dtype(dtype), backend=backend)
      assert (default.token_block, default.vocab_block) == picked, (dtype, backend)


def test_tiling_model_smoke(capsys):
  assert tiling_model.main(["--smoke", "--dtypes", "bfloat16"]) == 0
  assert "Pick for gpu" in capsys.readouterr().out


def test_shipped_table_is_empty_and_auto_is_xla():
  assert tuned.shipped_entries() == {}
  for backend in ("cpu", "gpu", "tpu"):
    assert dispatch.resolve_impl("auto", backend=backend, dtype=jnp.bfloat16) == "xla"


def test_table_entries_drive_defaults_and_auto(monkeypatch):
  kind = tuned.device_kind()  # "cpu" here
  entries = {
    kind: {
      "bfloat16": {"impl": "pallas_gpu", "xla": {"token_block": 384, "vocab_block": 640}},
      "float32": {"impl": "xla", "xla": {"token_block": 128, "vocab_block": 256}},
    }
  }
  entries = tuned.check_table({"format": tuned.FORMAT, "entries": entries}, "test")
  monkeypatch.setattr(tuned, "shipped_entries", lambda: entries)
  assert BlockSizes.get_default(jnp.bfloat16) == BlockSizes(384, 640)
  assert BlockSizes.get_default(jnp.float32) == BlockSizes(128, 256)
  assert cce_jax.resolve_impl("auto", dtype=jnp.bfloat16) == "pallas_gpu"
  assert cce_jax.resolve_impl("auto", dtype=jnp.float32) == "xla"
  assert cce_jax.resolve_impl("auto") == "xla"  # the dtypes disagree: xla
  # A backend absent from this process has no device kind: the modelled default.
  assert BlockSizes.get_default(jnp.bfloat16, backend="tpu") == BlockSizes(1024, 2048)


@pytest.mark.parametrize(
  ("table", "message"),
  [
    ({"format": 0, "entries": {}}, "`format` must be 1"),
    ({"format": 1, "entries": []}, "`entries` must be"),
    ({"format": 1, "entries": {"k": {"bfloat16": {"impl": "x"}}}}, ".impl must be"),
    (
      {"format": 1, "entries": {"k": {"bfloat16": {"impl": "xla", "xla": {}}}}},
      ".xla must hold",
    ),
  ],
)
def test_bad_table_is_named(table, message):
  with pytest.raises(ValueError, match=message):
    tuned.check_table(table, "t.json")


def test_accelerator_refuses_cpu_without_smoke(capsys):
  assert accelerator.main([]) == 2
  assert "pass --smoke" in capsys.readouterr().err


def test_accelerator_stops_loudly_on_mismatch(monkeypatch, tmp_path, capsys):
  honest = accelerator.loss_fn

  def off_by_one_percent(impl, interpret, **options):
    fn = honest(impl, interpret, **options)
    return fn if impl == "reference" else (lambda e, c, labels: 1.01 * fn(e, c, labels))

  monkeypatch.setattr(accelerator, "loss_fn", off_by_one_percent)
  assert accelerator.main(["--smoke", "--out-dir", str(tmp_path)]) == 1
  assert "MISMATCH" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_accelerator_smoke_writes_report_and_applies(tmp_path, capsys):
  table = tmp_path / "tuned.json"
  table.write_text(json.dumps({"format": 1, "entries": {}}))
  args = ["--smoke", "--apply", "--tuned", str(table), "--out-dir", str(tmp_path / "out")]
  assert accelerator.main(args) == 0
  (report,) = (tmp_path / "out").glob("accelerator-cpu-*.json")
  record = json.loads(report.read_text())
  assert record["device_kind"] == "cpu" and record["jax"] and record["date"]
  assert {row["impl"] for row in record["timings"]} == {"baseline", "xla", "pallas_gpu"}
  assert {row["dist"] for row in record["timings"]} == {"uniform", "trained"}
  assert all(row["grad_ms"] > 0 and row["grad_temp_bytes"] > 0 for row in record["timings"])
  assert any(row["impl"].startswith("pallas_gpu {") for row in record["sweep"])
  assert len(record["check"]) == 8  # 2 dtypes x filtering on/off x (xla, pallas_gpu)
  assert report.with_suffix(".md").read_text().startswith("## ")
  entry = json.loads(table.read_text())["entries"]["cpu"]["bfloat16"]
  assert entry == record["winners"] and entry["impl"] in ("xla", "pallas_gpu")
  assert (entry["xla"]["token_block"], entry["xla"]["vocab_block"]) in accelerator.SMOKE_XLA_SWEEP
  assert "| smoke | trained | xla |" in capsys.readouterr().out


def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
  assert accelerator.main(["--smoke", "--repeats", "0"]) == 2
  assert tiling_model.main(["--from-json", str(tmp_path / "missing.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0] == "accelerator.py: --repeats must be at least 1"
  assert err[1].startswith("--from-json: cannot read") and len(err) == 2
