"""The README's migration notes and its mixed-precision NNX snippet: every python block runs (as
written, on small random inputs) and gives the numbers of optax on materialized logits, computed
in float64 under ``jax.enable_x64``."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from testing import assert_rel_close

import cce_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIGRATION = "## Migrating from other libraries"
USING_IT = "## Using it"
# A phrase that names each block of the migration section (each must be in exactly one block).
MIGRATION_BLOCKS = {
  "apple": 'impl="cce_exact"',
  "optax": "where=mask",
  "tokamax": "tokamax.linear_softmax_cross_entropy_loss",
  "liger": "LigerFusedLinearCrossEntropyLoss",
  "linen": "class LM(nn.Module)",
}
# Sizes that are no multiple of any default block (2048 classes in f32, 512 in 16-bit).
BATCH, SEQ, DIM, VOCAB = 2, 13, 16, 2500
IGNORE = -100


def _python_blocks(section_title: str) -> list[str]:
  readme = (ROOT / "README.md").read_text()
  assert readme.count(f"\n{section_title}\n") == 1, f"README has no single {section_title!r}"
  section = readme.split(f"\n{section_title}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _block(section_title: str, phrase: str) -> str:
  blocks = [block for block in _python_blocks(section_title) if phrase in block]
  assert len(blocks) == 1, f"{len(blocks)} python blocks of {section_title!r} hold {phrase!r}"
  return blocks[0]


def _run(block: str, **names) -> dict:
  """Executes a README block with ``names`` (and the usual imports) in scope; its globals."""
  scope = {"jax": jax, "jnp": jnp, "optax": optax, "cce_jax": cce_jax, **names}
  exec(compile(block, "<README.md>", "exec"), scope)
  return scope


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _optax_per_token(logits, labels, where=None) -> np.ndarray:
  """optax's per-token cross-entropy in float64 (labels outside [0, V) give 0 and are masked
  by the caller)."""
  with jax.enable_x64(True):
    safe = jnp.clip(jnp.asarray(labels), 0, logits.shape[-1] - 1)
    out = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float64), safe, where=None if where is None else jnp.asarray(where)
    )
    return np.asarray(out)


def _masked_mean(per_token: np.ndarray, kept: np.ndarray) -> float:
  return float(np.sum(np.where(kept, per_token, 0.0)) / max(int(np.sum(kept)), 1))


def _hidden_classifier_labels(seed: int, *, ignored: bool):
  """Random e (B, T, D), c (V, D) float32 and labels (B, T), some ``IGNORE`` if asked."""
  rng = np.random.default_rng(seed)
  e = rng.standard_normal((BATCH, SEQ, DIM)).astype(np.float32)
  c = rng.standard_normal((VOCAB, DIM)).astype(np.float32) / np.sqrt(DIM) * 3
  labels = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
  if ignored:
    labels[rng.random((BATCH, SEQ)) < 0.3] = IGNORE
    labels[0, 1] = IGNORE
  return jnp.asarray(e), jnp.asarray(c), jnp.asarray(labels)


def test_every_migration_snippet_is_tested():
  blocks = _python_blocks(MIGRATION)
  for block in blocks:
    claimed = [name for name, phrase in MIGRATION_BLOCKS.items() if phrase in block]
    assert len(claimed) == 1, f"a migration snippet no test (or two) claims:\n{block}"
  assert len(blocks) == len(MIGRATION_BLOCKS)


def test_apple_snippet_matches_optax_on_shifted_logits():
  e, c, labels = _hidden_classifier_labels(0, ignored=True)
  out = _run(_block(MIGRATION, MIGRATION_BLOCKS["apple"]), e=e, c=c, labels=labels)
  logits = _f64(e)[:, :-1] @ _f64(c).T  # (B, T - 1, V)
  targets = np.asarray(labels)[:, 1:]
  kept = targets != IGNORE
  per_token = np.where(kept, _optax_per_token(logits, targets), 0.0)
  for name in ("loss", "pretrain", "exact"):
    assert_rel_close(name, out[name], _masked_mean(per_token, kept), 1e-5)
  assert_rel_close("nll", out["nll"], per_token, 1e-5)


def test_optax_snippet_matches_optax_where_softcap_and_smoothing():
  e, c, labels = _hidden_classifier_labels(1, ignored=False)
  mask = jnp.asarray(np.random.default_rng(2).random((BATCH, SEQ)) < 0.7)
  softcap, smoothing = 5.0, 0.1
  out = _run(
    _block(MIGRATION, MIGRATION_BLOCKS["optax"]),
    e=e,
    c=c,
    labels=labels,
    mask=mask,
    s=softcap,
    a=smoothing,
    V=VOCAB,
  )
  logits = _f64(e) @ _f64(c).T  # (B, T, V)
  expected = _optax_per_token(logits, labels, where=mask)
  assert_rel_close("per_token", out["per_token"], expected, 1e-5)
  assert_rel_close("loss", out["loss"], _masked_mean(expected, np.asarray(mask)), 1e-5)
  with jax.enable_x64(True):
    capped = softcap * jnp.tanh(jnp.asarray(logits) / softcap)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, VOCAB, dtype=jnp.float64), smoothing)
    smoothed = np.asarray(optax.softmax_cross_entropy(capped, targets))
  assert_rel_close("smoothed", out["smoothed"], smoothed, 1e-5)


def test_tokamax_snippet_is_the_sum_over_a_dv_classifier():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((37, DIM)), jnp.float32)  # (B, H)
  w = jnp.asarray(rng.standard_normal((DIM, VOCAB)) / np.sqrt(DIM) * 3, jnp.float32)  # (H, V)
  labels = jnp.asarray(rng.integers(0, VOCAB, 37), jnp.int32)
  out = _run(_block(MIGRATION, MIGRATION_BLOCKS["tokamax"]), x=x, w=w, labels=labels)
  expected = np.sum(_optax_per_token(_f64(x) @ _f64(w), labels))
  assert_rel_close("loss", out["loss"], expected, 1e-5)


def test_liger_snippet_gives_its_loss_and_z_term():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((41, DIM)), jnp.float32)  # (N, H)
  lin_weight = jnp.asarray(rng.standard_normal((VOCAB, DIM)) / np.sqrt(DIM) * 3, jnp.float32)
  target = rng.integers(0, VOCAB, 41).astype(np.int32)
  target[[0, 5, 6, 30]] = IGNORE
  k, smoothing, softcap = 0.01, 0.1, 5.0
  out = _run(
    _block(MIGRATION, MIGRATION_BLOCKS["liger"]),
    x=x,
    lin_weight=lin_weight,
    target=jnp.asarray(target),
    k=k,
    a=smoothing,
    s=softcap,
  )
  kept = target != IGNORE
  with jax.enable_x64(True):
    capped = softcap * jnp.tanh(jnp.asarray(_f64(x) @ _f64(lin_weight).T) / softcap)
    lse = np.asarray(jax.nn.logsumexp(capped, axis=-1))
    one_hot = jax.nn.one_hot(np.clip(target, 0, VOCAB - 1), VOCAB, dtype=jnp.float64)
    smoothed = np.asarray(
      optax.softmax_cross_entropy(capped, optax.smooth_labels(one_hot, smoothing))
    )
  z_term = _masked_mean(k * lse**2, kept)
  assert_rel_close("loss", out["loss"], _masked_mean(smoothed, kept) + z_term, 1e-5)
  assert_rel_close("z_term", out["z_term"], z_term, 1e-5)
  assert_rel_close("lse", out["lse"], lse, 1e-5)


def test_linen_recipe_tied_and_untied_match_optax_with_gradients():
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  out = _run(
    _block(MIGRATION, MIGRATION_BLOCKS["linen"]),
    V=VOCAB,
    D=DIM,
    rng=jax.random.key(6),
    tokens=tokens,
  )
  model, params = out["model"], out["params"]
  assert params["head"]["kernel"].shape == (DIM, VOCAB)
  assert params["embed"]["embedding"].shape == (VOCAB, DIM)

  def untied_reference(params):  # optax on the model's own (B, T, V) logits
    logits = model.apply({"params": params}, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))

  def attend_logits(module: nn.Module, tokens: jax.Array) -> jax.Array:  # (B, T, V)
    return module.embed.attend(module.hidden(tokens))

  def tied_reference(params):  # optax on nn.Embed.attend
    logits = model.apply({"params": params}, tokens, method=attend_logits)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))

  for ours, reference in (
    (out["untied_loss"], untied_reference),
    (out["tied_loss"], tied_reference),
  ):
    loss, grads = jax.value_and_grad(ours)(params, tokens)
    with jax.enable_x64(True):
      params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
      expected, expected_grads = jax.value_and_grad(reference)(params64)
      expected_grads = jax.tree.map(np.asarray, expected_grads)
    assert_rel_close(f"{reference.__name__} loss", loss, float(expected), 1e-5)
    for (path, grad), expected_grad in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads), strict=True
    ):
      name = f"{reference.__name__} d{jax.tree_util.keystr(path)}"
      if np.any(expected_grad):
        assert_rel_close(name, grad, expected_grad, 1e-4)
      else:  # the untied head takes no part in the tied loss
        assert not np.any(np.asarray(grad)), name


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)  # float32 parameters: kernel (D, V)


def _nnx_inputs(seed: int):
  """An f32 model, bf16 activations h (B, T, D) and tokens (B, T) with some PAD."""
  rng = np.random.default_rng(seed)
  model = _Model(nnx.Rngs(seed))
  model.head.bias[...] = jnp.asarray(rng.standard_normal(VOCAB) * 0.5, jnp.float32)
  h = jnp.asarray(rng.standard_normal((BATCH, SEQ, DIM)) * 3, jnp.bfloat16)
  pad = 7
  tokens = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
  tokens[rng.random((BATCH, SEQ)) < 0.25] = pad
  tokens[1, -1] = pad
  return model, h, jnp.asarray(tokens), pad


def _nnx_cce_block() -> str:
  return _block(USING_IT, "model.head.kernel[...]")


def test_nnx_snippet_casts_f32_parameters_to_bf16_activations():
  model, h, tokens, pad = _nnx_inputs(7)
  block = _nnx_cce_block()
  assert ".astype(h.dtype)" in block
  assert model.head.kernel[...].dtype == jnp.float32 and h.dtype == jnp.bfloat16

  def snippet_loss(model: _Model) -> jax.Array:
    return _run(block, model=model, h=h, tokens=tokens, PAD=pad)["loss"]

  loss, grads = nnx.value_and_grad(snippet_loss)(model)

  # float64 optax on the logits of the bf16 values the loss multiplies (kernel rounded to bf16).
  kernel16, bias = model.head.kernel[...].astype(jnp.bfloat16), model.head.bias[...]
  targets = np.asarray(tokens)[:, 1:]
  kept = targets != pad

  def reference(kernel):
    logits = jnp.asarray(_f64(h))[:, :-1] @ kernel + jnp.asarray(_f64(bias))
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(kept, per_token, 0.0)) / np.sum(kept)

  with jax.enable_x64(True):
    expected, expected_grad = jax.value_and_grad(reference)(jnp.asarray(_f64(kernel16)))
  assert_rel_close("loss", loss, float(expected), 1e-5)
  kernel_grad = grads["head"]["kernel"][...]
  assert kernel_grad.dtype == jnp.float32  # back through the cast to the f32 parameter
  # bf16 gradient with filtering at 2**-12: a few bf16 roundings and the filter's bound.
  assert_rel_close("dkernel", kernel_grad, np.asarray(expected_grad), 2e-2)

  # And the README's own materialized version (bf16 h times the f32 kernel) agrees to the
  # rounding of the kernel to bf16.
  materialized = _block(USING_IT, "model.head(h)")
  baseline = _run(materialized, model=model, h=h, tokens=tokens, PAD=pad)["loss"]
  assert_rel_close("materialized", loss, float(baseline), 1e-2)


def test_nnx_snippet_without_the_cast_fails_naming_the_cast():
  model, h, tokens, pad = _nnx_inputs(8)
  uncast = _nnx_cce_block().replace(".astype(h.dtype)", "")
  with pytest.raises(TypeError) as raised:
    _run(uncast, model=model, h=h, tokens=tokens, PAD=pad)
  message = str(raised.value)
  for part in ("`c` and `e` must have the same dtype", "float32", "bfloat16", "c.astype(e.dtype)"):
    assert part in message, f"{part!r} not in: {message}"
