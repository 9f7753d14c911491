"""Token statistics of a Pallas forward under ``jax.vmap``: the examples folded into one call.

A ``pallas_call`` is not batched the same way by every backend's interpreter (TPU interpret
mode cannot run a vmapped one), and one call over every example's tokens is also the fast way
on a device. :func:`fold_examples` wraps a ``cce_jax.local_stats`` forward so that, under
``jax.vmap``, the mapped axis of ``e`` and the labels is folded into the token axis, as
``cce_jax.tiled.fold_examples`` does for the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.custom_batching import custom_vmap

from cce_jax.local_stats import LocalStats
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs, fold_or_sequence

StatsForward = Callable[[TiledInputs, LossOptions], LocalStats]


def fold_examples(forward: StatsForward) -> StatsForward:
  """``forward`` that, under ``jax.vmap``, runs once over every example's tokens (each
  :class:`LocalStats` field (N,) per example); a classifier or bias mapped per example cannot
  be folded: the examples then run one after another."""

  @functools.cache
  def folded(opts: LossOptions):
    @custom_vmap
    def call(e, c, local_labels, bias):
      return forward(TiledInputs(e, c, local_labels, bias), opts)

    @call.def_vmap
    def rule(axis_size, in_batched, e, c, local_labels, bias):
      inputs = TiledInputs(e, c, local_labels, bias)
      one_call = lambda inputs: forward(inputs, opts)
      out, num_tokens = fold_or_sequence(call, one_call, axis_size, in_batched, inputs)
      if num_tokens is not None:  # (B N,) each
        out = jax.tree.map(lambda x: x.reshape(axis_size, num_tokens), out)
      return out, jax.tree.map(lambda _: True, out)

    return call

  def folded_forward(inputs: TiledInputs, opts: LossOptions) -> LocalStats:
    return folded(opts)(*inputs)

  return folded_forward
