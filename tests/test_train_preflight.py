"""The trainer's preflight (data fills its batches, the compiled step fits the device), its plain
log lines (tokens/s, MFU, ETA) and the hardware table behind MFU.

The memory preflight is tested on the CPU with a fake device limit (a CPU reports none); the
data preflight with the tests' small corpus and batches it cannot fill.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np
import pytest
import train_testing
from flax import nnx

from train import aot, cli, config, data, hardware, metrics, preflight, progress
from train.model import Transformer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


@pytest.fixture(scope="module")
def prepared(base) -> data.PreparedData:
  return train_testing.prepare_data(base / "data_cache")


# --------------------------------------------------------------------------------------------
# Data preflight.


def _cfg(*overrides: str) -> config.TrainConfig:
  return config.load(None, list(overrides))


def test_check_data_passes_when_both_splits_fill_their_batches():
  # 24 tokens = 3 windows of 8 in each split: one batch of 3 each.
  cfg = _cfg("seq_len=8", "batch_size=3", "eval_batches=1", "eval_every=5")
  preflight.check_data(cfg, num_train_tokens=24, num_eval_tokens=24)


@pytest.mark.parametrize(
  ("tokens", "message"),
  [
    (
      (23, 100),
      "data: the train split holds 23 tokens = 2 windows of seq_len=8, but one global "
      "batch (batch_size=3) needs 3; use more data (data.source, data.paths), a smaller "
      "batch_size or seq_len, or a larger data.max_corpus_bytes",
    ),
    (
      (100, 47),
      "data: the eval split holds 47 tokens = 5 windows of seq_len=8, but evaluation "
      "(eval_batches=2 x batch_size=3) needs 6; use more data (data.source, "
      "data.paths), a smaller batch_size or seq_len, a larger data.eval_fraction, "
      "fewer eval_batches, or eval_every=0",
    ),
  ],
)
def test_check_data_names_the_split_its_windows_and_the_keys(tokens, message):
  cfg = _cfg("seq_len=8", "batch_size=3", "eval_batches=2", "eval_every=5")
  with pytest.raises(config.ConfigError) as error:
    preflight.check_data(cfg, *tokens)
  assert str(error.value) == message


def test_check_data_skips_the_eval_split_without_evaluation():
  cfg = _cfg("seq_len=8", "batch_size=3", "eval_batches=2", "eval_every=0")
  preflight.check_data(cfg, num_train_tokens=24, num_eval_tokens=0)


def test_trainer_stops_at_once_when_the_eval_split_is_too_small(base, prepared, tmp_path, capsys):
  eval_windows = prepared.num_eval_tokens // 32
  batches = eval_windows // 8 + 1  # one batch more than the eval split holds
  args = train_testing.overrides(
    tmp_path / "run", base / "data_cache", "steps=500", "eval_every=100", f"eval_batches={batches}"
  )
  assert cli.main(args) == 2
  out, err = capsys.readouterr()
  assert err.startswith(
    f"config error: data: the eval split holds {prepared.num_eval_tokens} "
    f"tokens = {eval_windows} windows of seq_len=32"
  )
  assert f"needs {8 * batches}" in err and len(err.strip().splitlines()) == 1
  assert "starting" not in out  # stopped before compiling
  # The writability probe may have made checkpoints/, but no step was saved.
  assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))


def test_trainer_stops_at_once_when_the_train_split_cannot_fill_a_batch(
  base, prepared, tmp_path, capsys
):
  seq_len = prepared.num_train_tokens // 4 + 1  # 3 windows
  args = train_testing.overrides(
    tmp_path / "run", base / "data_cache", f"seq_len={seq_len}", "batch_size=4"
  )
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"the train split holds {prepared.num_train_tokens} tokens = 3 windows" in err
  assert "one global batch (batch_size=4) needs 4" in err


def test_max_corpus_bytes_caps_only_the_embedded_corpus(tmp_path):
  # 40 kB of text with a cap of 2 kB: the user's text is read whole (a byte-level BPE of 300
  # symbols makes more tokens than the 2 kB cut would allow), the stdlib corpus is cut.
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghij"), size=5)) for _ in range(300)]
  text = " ".join(rng.choice(words, size=6700)) + "\n"
  (tmp_path / "doc.txt").write_text(text)
  assert len(text.encode()) > 40_000
  cfg = data.DataConfig(
    source="text",
    paths=(str(tmp_path / "doc.txt"),),
    vocab_size=300,
    max_corpus_bytes=2_000,
    eval_fraction=0.0,
    cache_dir=str(tmp_path / "c"),
  )
  own = data.prepare(cfg)
  # Byte-level BPE with 300 - 257 merges: more than 2000 tokens only if more than 2000 bytes.
  assert own.num_train_tokens > 2_001
  stdlib = data.prepare(
    data.DataConfig(
      vocab_size=300, max_corpus_bytes=2_000, eval_fraction=0.0, cache_dir=str(tmp_path / "c")
    )
  )
  assert stdlib.num_train_tokens <= 2_001  # at most one token per byte, plus the end-of-text


# --------------------------------------------------------------------------------------------
# Memory preflight, with a fake device limit.


def test_check_memory_names_the_numbers_and_the_keys():
  with pytest.raises(config.ConfigError) as error:
    preflight.check_memory(3 * 2**30, 2**30 + 2**29, "TPU v5", {"data": 1, "fsdp": 16})
  assert str(error.value) == (
    "memory: the compiled train step needs 3.00 GiB per device, more than the 1.50 GiB a "
    "TPU v5 device allows (mesh {'data': 1, 'fsdp': 16}); change batch_size, "
    "grad_accum_steps, mesh (fsdp/tensor), model.remat=true, model.attention_chunk, and "
    "check with python -m train.aot"
  )
  preflight.check_memory(2**30, 2**30, "TPU v5", {})  # equal: fits
  preflight.check_memory(None, 1, "cpu", {})  # nothing reported: nothing to check
  preflight.check_memory(1, None, "cpu", {})


def test_device_memory_limit_reads_bytes_limit():
  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  assert preflight.device_memory_limit(Device({"bytes_limit": 17, "bytes_in_use": 3})) == 17
  assert preflight.device_memory_limit(Device({"bytes_in_use": 3})) is None
  assert preflight.device_memory_limit(Device(None)) is None
  assert preflight.device_memory_limit(jax.devices()[0]) is None  # the CPU reports none


def test_trainer_stops_before_step_1_when_the_step_exceeds_the_device(
  base, tmp_path, capsys, monkeypatch
):
  limit = 2**20  # a fake 1 MiB device (steps=2: the program of the next test, compiled once)
  monkeypatch.setattr(preflight, "device_memory_limit", lambda device: limit)
  args = train_testing.overrides(tmp_path / "run", base / "data_cache", "steps=2")
  assert cli.main(args) == 2
  out, err = capsys.readouterr()
  # The peak the message names is the compiled step's, as train.aot computes it.
  cfg = config.load(None, args)
  peak = aot.compile_train_step(cfg, batch_size=None).peak_bytes
  assert peak > limit
  assert err == (
    f"config error: memory: the compiled train step needs {preflight.size(peak)} "
    "per device, more than the 1.0 MiB a cpu device allows (mesh {'data': 1, "
    "'fsdp': 1, 'tensor': 1}); change batch_size, grad_accum_steps, mesh "
    "(fsdp/tensor), model.remat=true, model.attention_chunk, and check with "
    "python -m train.aot\n"
  )
  assert "step 1/2" not in out and not list((tmp_path / "run").glob("checkpoints/[0-9]*"))


def test_trainer_runs_when_the_step_fits_the_device(base, prepared, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(preflight, "device_memory_limit", lambda device: 2**40)
  args = train_testing.overrides(tmp_path / "run", base / "data_cache", "steps=2")
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  # The start line gives both splits' token counts.
  assert (
    f"{prepared.num_train_tokens:,} training and {prepared.num_eval_tokens:,} eval tokens" in out
  )
  # Not a terminal (captured): plain lines, one per logged step, with ETA and no MFU (CPU).
  lines = [line for line in out.splitlines() if line.startswith("step ") and "/2 " in line]
  assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
  assert "tokens/s" in lines[0] and "ETA" in lines[0] and "MFU" not in lines[0]
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert all({"tokens_per_s", "step_time_s", "eta_s"} <= set(r) for r in records)
  assert all("mfu" not in r for r in records)
  assert records[-1]["eta_s"] == 0.0


# --------------------------------------------------------------------------------------------
# Hardware table, model FLOPs, MFU.


@pytest.mark.parametrize(
  ("kind", "chip"),
  [
    ("TPU v4", "v4"),
    ("TPU v5 lite", "v5e"),
    ("TPU v5e", "v5e"),
    ("TPU v5", "v5p"),
    ("TPU v5p", "v5p"),
    ("TPU v6 lite", "v6e"),
    ("TPU v6e", "v6e"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H200", "h200"),
    ("cpu", None),
    ("TPU v3", None),
    ("NVIDIA L4", None),
  ],
)
def test_device_kinds_map_to_chips(kind, chip):
  assert hardware.chip_of(kind) == chip
  expected = None if chip is None else hardware.CHIPS[chip].peak_bf16_flops
  assert hardware.peak_flops(kind) == expected


def test_peak_table_holds_the_published_bf16_numbers():
  peaks = {name: chip.peak_bf16_flops / 1e12 for name, chip in hardware.CHIPS.items()}
  assert peaks == {
    "v4": 275,
    "v5e": 197,
    "v5p": 459,
    "v6e": 918,
    "a100": 312,
    "h100": 989,
    "h100_pcie": 756,
    "h200": 989,
  }


def test_matmul_params_of_llama3_8b_match_its_published_size():
  model = config.load(train_testing.ROOT / "configs" / "llama3_8b_v5p32.yaml").model
  embedding = model.vocab_size * model.d_model
  norms = (2 * model.num_layers + 1) * model.d_model
  assert hardware.matmul_params(model) + embedding + norms == 8_030_261_248  # Llama 3 8B


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_count_the_models_own_parameters(tied):
  model_cfg = dataclasses.replace(
    config.ModelConfig(),
    vocab_size=300,
    d_model=24,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=10,
    mlp_dim=40,
    tie_embeddings=tied,
  )
  model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  counts = {"/".join(map(str, path)): leaf.size for path, leaf in params}
  total = sum(counts.values())
  norms = sum(n for name, n in counts.items() if "norm" in name)
  embedding = 300 * 24
  # Every parameter but the norms and the embedding lookup is a matmul weight; a tied model's
  # head is the embedding table, used once as a matmul.
  assert hardware.matmul_params(model_cfg) == total - norms - (0 if tied else embedding)


def test_mfu_of_a_known_run():
  model = config.load(train_testing.ROOT / "configs" / "llama3_8b_v5p32.yaml").model
  flops = hardware.model_flops_per_token(model, 8192)
  assert flops == 6 * 7_504_658_432 + 12 * 32 * 32 * 128 * 8192
  assert flops == 57_912_852_480
  # 16 v5p chips at 60,000 tokens/s: 60e3 * 5.791285248e10 / (16 * 459e12) = 0.47314...
  assert hardware.mfu(60_000.0, flops, 16, 459e12) == pytest.approx(0.4731442196, rel=1e-9)
  assert hardware.mfu(60_000.0, flops, 16, None) is None


# --------------------------------------------------------------------------------------------
# Throughput and plain log lines.


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


def test_throughput_metrics():
  cfg = config.load(
    train_testing.ROOT / "configs" / "llama3_8b_v5p32.yaml",
    ["steps=1000", "model.vocab_size=128256"],
  )
  throughput = progress.Throughput.of(cfg, [_Device("TPU v5")] * 16)
  values = throughput.metrics(step=100, step_time_s=16.0)
  tokens_per_s = 128 * 8192 / 16.0
  assert values["tokens_per_s"] == tokens_per_s and values["step_time_s"] == 16.0
  assert values["eta_s"] == 900 * 16.0
  flops = hardware.model_flops_per_token(cfg.model, 8192)
  assert values["mfu"] == pytest.approx(tokens_per_s * flops / (16 * 459e12), rel=1e-12)
  on_cpu = progress.Throughput.of(cfg, [_Device("cpu")]).metrics(step=1000, step_time_s=2.0)
  assert "mfu" not in on_cpu and on_cpu["eta_s"] == 0.0


def test_format_line_and_duration():
  record = {
    "loss": 5.12345,
    "learning_rate": 3e-4,
    "grad_norm": 0.8123,
    "tokens_per_s": 61440.4,
    "step_time_s": 17.07,
    "mfu": 0.4134,
    "eta_s": 168_660.0,
  }
  assert progress.format_line(120, 10000, record) == (
    "step 120/10000 loss 5.1235 lr 3.00e-04 grad_norm 0.812 tokens/s 61,440 time/step 17.1 s "
    "MFU 41.3% ETA 1d 22h 51m"
  )
  assert progress.format_line(3, 9, {"loss": 1.0, "eval_loss": 2.0}) == (
    "step 3/9 loss 1.0000 eval_loss 2.0000"
  )
  assert [progress.format_duration(s) for s in (4.2, 75, 3 * 3600 + 61, 86400)] == [
    "4s",
    "1m 15s",
    "3h 1m",
    "1d 0h 0m",
  ]


def test_is_terminal():
  assert not progress.is_terminal(io.StringIO())

  class Tty(io.StringIO):
    def isatty(self):
      return True

  assert progress.is_terminal(Tty(), Tty()) and not progress.is_terminal(Tty(), io.StringIO())


@pytest.mark.parametrize(
  ("progress_on", "terminal", "plain"),
  [(True, False, True), (False, False, True), (False, True, True), (True, True, False)],
)
def test_writer_prints_plain_lines_unless_the_bar_shows_on_a_terminal(
  tmp_path, capsys, monkeypatch, progress_on, terminal, plain
):
  monkeypatch.setattr(progress, "is_terminal", lambda *streams: terminal)
  writer = metrics.MetricsWriter(
    tmp_path, total_steps=4, start_step=0, enabled=True, progress=progress_on, tensorboard=False
  )
  assert writer.bar.disable == plain
  writer.write(2, {"loss": 3.0, "tokens_per_s": 10.0, "eta_s": 5.0, "mfu": 0.5})
  writer.close()
  out = capsys.readouterr().out
  line = "step 2/4 loss 3.0000 tokens/s 10 MFU 50.0% ETA 5s"
  assert (line in out.splitlines()) == plain
  assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] == 0.5


def test_writer_of_other_processes_prints_nothing(tmp_path, capsys):
  writer = metrics.MetricsWriter(
    tmp_path, total_steps=4, start_step=0, enabled=False, progress=False, tensorboard=False
  )
  writer.write(2, {"loss": 3.0})
  writer.close()
  assert capsys.readouterr().out == ""
  assert not (tmp_path / "metrics.jsonl").exists()
