"""Compiled temporary memory of ``impl="xla"``: bounded by its tiles, never by N x V.

Each test compiles for abstract ``jax.ShapeDtypeStruct`` arguments (nothing is allocated or
run) and compares ``memory_analysis().temp_size_in_bytes`` with a bound derived from the
default :class:`cce_jax.BlockSizes`. The bounds leave room for a few extra tiles but are far
below what materializing the logits (N x V f32) or a full f32 copy of the classifier (V x D)
would need; each test also asserts that, so a bound cannot silently become vacuous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import cce_jax

F32 = 4  # bytes
# Headroom over the counted buffers for fusion temporaries, copies around loop carries and
# lax.cond, and allocation alignment.
SLACK = 1.25
# The paper's shape (Gemma 2 2B): N tokens, hidden size D, V classes.
N, D, V = 8192, 2304, 256000


def temp_bytes(fn: Callable[..., Any], *args: jax.ShapeDtypeStruct) -> int:
  """Temporary bytes of ``jax.jit(fn)`` compiled for ``args``; nothing is executed."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    pytest.skip(f"backend {jax.default_backend()!r} reports no memory analysis")
  return int(stats.temp_size_in_bytes)


def _args(n: int, d: int, v: int, dtype=jnp.float32) -> tuple[jax.ShapeDtypeStruct, ...]:
  return (
    jax.ShapeDtypeStruct((n, d), dtype),
    jax.ShapeDtypeStruct((v, d), dtype),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )


def _loss(e, c, labels):
  return cce_jax.linear_cross_entropy(e, c, labels, impl="xla")


_loss_and_grad = jax.value_and_grad(_loss, argnums=(0, 1))


def _blocks(n: int, v: int) -> tuple[int, int]:
  """The default block sizes as the implementation clamps them to the problem."""
  sizes = cce_jax.BlockSizes.get_default()
  return min(sizes.token_block, n), min(sizes.vocab_block, v)


def forward_bound(n: int, d: int, v: int) -> int:
  """Temp bytes the f32 loss (forward only) may use."""
  tb, vb = _blocks(n, v)
  counted = (
    2 * vb * d * F32  # the classifier block being multiplied (and one more in flight)
    + 2 * tb * d * F32  # the token block of e (and one more in flight)
    + 2 * tb * vb * F32  # logit tile and its exp / masked copy
    + 4 * (n + v) * F32  # per-token loss, lse, running max/sum; per-class vectors
  )
  return int(SLACK * counted)


def loss_and_grad_bound(n: int, d: int, v: int) -> int:
  """Temp bytes the f32 loss + gradient w.r.t. e and c may use."""
  tb, vb = _blocks(n, v)
  counted = (
    n * d * F32  # the f32 dE accumulator (for f32 e XLA may place it in the output)
    + 4 * vb * d * F32  # gathered c block, dC block accumulator, dC product, its sum
    + 2 * tb * d * F32  # e block, dE product for its rows
    + 2 * tb * vb * F32  # logit tile and softmax-gradient tile
    + 4 * (n + v) * F32  # lse, loss coefficients; class score, sort keys and order
  )
  return int(SLACK * counted)


def _assert_meaningful(bound: int, n: int, d: int, v: int) -> None:
  """The bound rejects the N x V f32 logits and a (V, D) f32 copy of the classifier."""
  assert bound < n * v * F32, (bound, n * v * F32)
  assert bound < v * d * F32, (bound, v * d * F32)


def test_forward_temp_memory_is_tile_bounded():
  # Measured on XLA:CPU (jax 0.10.2): 36.7 MB; bound 97.0 MB; N x V f32 would be 8.4 GB.
  bound = forward_bound(N, D, V)
  _assert_meaningful(bound, N, D, V)
  used = temp_bytes(_loss, *_args(N, D, V))
  assert used <= bound, f"forward temp {used:,} B > bound {bound:,} B"


def test_loss_and_grad_temp_memory_is_tile_bounded():
  # Measured on XLA:CPU (jax 0.10.2): 103.9 MB; bound 238.6 MB; a (V, D) f32 copy is 2.36 GB.
  bound = loss_and_grad_bound(N, D, V)
  _assert_meaningful(bound, N, D, V)
  used = temp_bytes(_loss_and_grad, *_args(N, D, V))
  assert used <= bound, f"loss+grad temp {used:,} B > bound {bound:,} B"


@pytest.mark.parametrize("mode", ["loss", "loss+grad"])
def test_ragged_shape_makes_no_padded_copy(mode):
  # N and V are not multiples of the blocks: the overlapping last block must not need a
  # padded copy of c (51200 x 2304 f32 = 472 MB) or of e.
  # Measured on XLA:CPU (jax 0.10.2): 36.7 MB (loss) and 103.1 MB (loss+grad);
  # bounds 92.9 MB and 234.5 MB.
  n, v = 8191, 50257
  fn, bound_fn = (_loss, forward_bound) if mode == "loss" else (_loss_and_grad, loss_and_grad_bound)
  bound = bound_fn(n, D, v)
  _assert_meaningful(bound, n, D, v)
  padded_v = -(-v // _blocks(n, v)[1]) * _blocks(n, v)[1]
  assert bound < padded_v * D * F32
  used = temp_bytes(fn, *_args(n, D, v))
  assert used <= bound, f"{mode} temp {used:,} B > bound {bound:,} B"


def test_temp_memory_grows_only_by_vectors_with_vocab():
  # From V=32768 to V=256000 only O(V) vectors may grow (8 f32 per extra class is generous);
  # any (V, D)- or (N, V)-sized temporary would add gigabytes. Measured: +0.9 MB.
  small, large = 32768, V
  grown = temp_bytes(_loss_and_grad, *_args(N, D, large)) - temp_bytes(
    _loss_and_grad, *_args(N, D, small)
  )
  assert grown <= 8 * (large - small) * F32, f"temp grew by {grown:,} B"


def test_weighted_loss_and_grad_keeps_the_bound():
  # Per-token weights (an argument, differentiated too) add O(N) vectors only.
  # Measured on XLA:CPU (jax 0.10.2): 105.0 MB; bound 238.6 MB.
  def weighted(e, c, labels, weights):
    return cce_jax.linear_cross_entropy(e, c, labels, weights=weights, impl="xla")

  args = (*_args(N, D, V), jax.ShapeDtypeStruct((N,), jnp.float32))
  bound = loss_and_grad_bound(N, D, V)
  used = temp_bytes(jax.value_and_grad(weighted, argnums=(0, 1, 3)), *args)
  assert used <= bound, f"weighted loss+grad temp {used:,} B > bound {bound:,} B"


def test_bf16_loss_and_grad_on_cpu_holds_no_extra_classifier_copies():
  # XLA:CPU has no 16-bit matrix product or scatter. Loop-invariant code motion keeps one f32
  # copy of c for the tiles' products (a CPU artifact, README "bfloat16 on XLA:CPU"). Beyond
  # it the loss+grad may hold dC's 16-bit bits while its blocks are written, nothing more:
  # the vocabulary sort's score no longer converts c to f32 for a product, and the dC
  # blocks are no longer written through a whole-array f32 upcast of dC (each block's
  # scatter was converting all of dC to f32 and back). Measured on XLA:CPU (jax 0.10.2):
  # 3.64 GB; 4.89 GB before.
  if jax.default_backend() != "cpu":
    pytest.skip("an XLA:CPU compiler artifact")
  used = temp_bytes(_loss_and_grad, *_args(N, D, V, jnp.bfloat16))
  f32_copy_of_c, bf16_dc = V * D * F32, V * D * 2
  bound = f32_copy_of_c + bf16_dc + loss_and_grad_bound(N, D, V)
  assert bound < 2 * f32_copy_of_c  # two f32 copies of c fail it
  assert used <= bound, f"bf16 loss+grad temp {used:,} B > bound {bound:,} B"
