"""A Llama/Gemma-style decoder-only transformer in Flax NNX.

Token embedding, rotary position embedding (RoPE), RMSNorm (pre-norm), multi-head or grouped-
query causal attention, SwiGLU MLP, a final RMSNorm, and an output layer that is either its own
(D, V) kernel or the (V, D) embedding table (tied). The model returns the final hidden states;
the output layer's weight is handed to the loss (``train/loss.py``), which never needs the
logits. Parameters are kept in ``param_dtype`` (f32) and cast to ``dtype`` (bf16) for compute.

The layers are one stacked module (every parameter has a leading "layers" axis) run by
``nnx.scan``, so a 32-layer model compiles as fast as a 1-layer one; with ``remat`` each layer
is ``nnx.remat``-ed: the backward keeps only the (B, T, D) input of every layer.

Every parameter carries logical axis names (``nnx.with_partitioning``) that the config's
``mesh.rules`` map onto mesh axes; activations are constrained with ``train.sharding.constrain``.
Shape letters: B batch, T sequence, D model width, H query heads, K key/value heads, G = H / K,
Dh head width, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train.config import ModelConfig
from train.sharding import constrain


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def _fan_in_init(in_axis, out_axis):
  """Truncated-normal init with variance 1 / fan_in over the given kernel axes."""
  return jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
  )


def rope(x_BTNH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of (B, T, N, Dh) queries or keys (rotate-half form), f32 math."""
  half = x_BTNH.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (Dh/2,)
  angles_TH = positions_T.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles_TH)[None, :, None, :], jnp.cos(angles_TH)[None, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head / grouped-query self-attention with RoPE."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
    self.q = nnx.Einsum(
      "BTD,DNH->BTNH",
      (d, h, dh),
      kernel_init=nnx.with_partitioning(_fan_in_init(0, (1, 2)), ("embed", "heads", "head_dim")),
      **kw,
    )
    self.k = nnx.Einsum(
      "BTD,DNH->BTNH",
      (d, k, dh),
      kernel_init=nnx.with_partitioning(_fan_in_init(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      **kw,
    )
    self.v = nnx.Einsum(
      "BTD,DNH->BTNH",
      (d, k, dh),
      kernel_init=nnx.with_partitioning(_fan_in_init(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
      **kw,
    )
    self.o = nnx.Einsum(
      "BTNH,NHD->BTD",
      (h, dh, d),
      kernel_init=nnx.with_partitioning(_fan_in_init((0, 1), 2), ("heads", "head_dim", "embed")),
      **kw,
    )

  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array) -> jax.Array:
    cfg = self.cfg
    q_BTHD = constrain(
      rope(self.q(x_BTD), positions_T, cfg.rope_theta), ("act_batch", "act_seq", "act_heads", None)
    )
    k_BTKD = constrain(
      rope(self.k(x_BTD), positions_T, cfg.rope_theta),
      ("act_batch", "act_seq", "act_kv_heads", None),
    )
    v_BTKD = constrain(self.v(x_BTD), ("act_batch", "act_seq", "act_kv_heads", None))
    # Grouped-query attention: jax.nn.dot_product_attention maps query head n to kv head
    # n // G, as the (H, Dh) query kernel is laid out.
    out_BTHD = causal_attention(q_BTHD, k_BTKD, v_BTKD, cfg.attention_chunk)
    return self.o(out_BTHD)


def causal_attention(
  q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, chunk: int | None
) -> jax.Array:
  """Causal (grouped-query) attention, (B, T, H, Dh); with ``chunk``, queries in checkpointed
  chunks of ``chunk`` (which must divide T), so that the backward holds one chunk's
  (B, H, chunk, T) scores at a time instead of (B, H, T, T).

  Raises:
    ValueError: ``chunk`` does not divide the sequence length.
  """
  seq_len = q_BTHD.shape[1]
  if chunk is None or chunk >= seq_len:
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True)
  if seq_len % chunk:
    raise ValueError(f"model.attention_chunk={chunk} must divide seq_len={seq_len}.")
  batch, _, heads, head_dim = q_BTHD.shape
  q_CBcHD = q_BTHD.reshape(batch, seq_len // chunk, chunk, heads, head_dim).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(start, q_BcHD):
    mask_cT = start + jnp.arange(chunk)[:, None] >= jnp.arange(seq_len)[None, :]
    return jax.nn.dot_product_attention(q_BcHD, k_BTKD, v_BTKD, mask=mask_cT[None, None])

  starts = jnp.arange(seq_len // chunk) * chunk
  out_CBcHD = jax.lax.map(lambda args: one_chunk(*args), (starts, q_CBcHD))
  return out_CBcHD.swapaxes(0, 1).reshape(batch, seq_len, heads, head_dim)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(
      use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs
    )
    up_init = nnx.with_partitioning(_fan_in_init(0, 1), ("embed", "mlp"))
    self.gate = nnx.Linear(cfg.d_model, cfg.mlp_dim, kernel_init=up_init, **kw)
    self.up = nnx.Linear(cfg.d_model, cfg.mlp_dim, kernel_init=up_init, **kw)
    self.down = nnx.Linear(
      cfg.mlp_dim,
      cfg.d_model,
      kernel_init=nnx.with_partitioning(_fan_in_init(0, 1), ("mlp", "embed")),
      **kw,
    )

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    hidden_BTF = constrain(
      jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD), ("act_batch", "act_seq", "act_mlp")
    )
    return self.down(hidden_BTF)


def _rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    cfg.d_model,
    epsilon=cfg.norm_eps,
    dtype=_dtype(cfg.dtype),
    param_dtype=_dtype(cfg.param_dtype),
    scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
    rngs=rngs,
  )


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.attn_norm = _rms_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _rms_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array, key: jax.Array | None) -> jax.Array:
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    x_BTD = x_BTD + _dropout(self.attn(self.attn_norm(x_BTD), positions_T), self.dropout, keys[0])
    x_BTD = constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))
    x_BTD = x_BTD + _dropout(self.mlp(self.mlp_norm(x_BTD)), self.dropout, keys[1])
    return constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))


class Transformer(nnx.Module):
  """The decoder: ``model(tokens) -> hidden states``, ``model.classifier() -> (weight, layout)``.

  Args:
    cfg: the model config; ``cfg.vocab_size`` must be set (not None).
    rngs: parameter initialization RNG streams.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vocab_size is None:
      raise ValueError("ModelConfig.vocab_size must be set before building the model")
    # Variables are created unsharded here (no eager resharding, so the model also builds
    # outside a mesh); the trainer places them with the jitted init's out_shardings.
    with nnx.use_eager_sharding(False):
      self._build(cfg, rngs)

  def _build(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    self.cfg = cfg
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(stddev=0.02), ("vocab", "embed")
      ),
      rngs=rngs,
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = _rms_norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = nnx.Linear(
        cfg.d_model,
        cfg.vocab_size,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_fan_in_init(0, 1), ("embed", "vocab")),
        rngs=rngs,
      )

  def __call__(self, tokens_BT: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Final hidden states (B, T, D) in ``cfg.dtype`` of int tokens (B, T).

    ``dropout_key`` (a typed PRNG key) turns on ``cfg.dropout`` (training); None turns it off
    (evaluation).
    """
    cfg = self.cfg
    # The lookup reads a table gathered over its "embed" axis (FSDP) but still split over
    # "vocab": XLA then gathers locally and sums over the vocabulary shards, instead of
    # resharding the (B, T, D) result from a D-split layout (a full rematerialization).
    table_VD = constrain(self.embed.embedding[...].astype(_dtype(cfg.dtype)), ("vocab", None))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0)
    if cfg.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(cfg.d_model**0.5, x_BTD.dtype)
    x_BTD = constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))
    positions_T = jnp.arange(tokens_BT.shape[-1], dtype=jnp.int32)
    # Decided here, statically: a scanned typed key has ndim 0, so the key itself cannot say.
    use_dropout = cfg.dropout > 0 and dropout_key is not None
    if use_dropout:
      keys_L = jax.random.split(dropout_key, cfg.num_layers)  # (L,) typed keys
    else:
      keys_L = jnp.zeros((cfg.num_layers,), jnp.uint32)  # unused: no dropout

    def layer(block: Block, x_BTD: jax.Array, key: jax.Array) -> jax.Array:
      return block(x_BTD, positions_T, key if use_dropout else None)

    if cfg.remat:
      layer = nnx.remat(layer, prevent_cse=False)

    @nnx.scan(
      in_axes=(0, nnx.Carry, 0),
      out_axes=nnx.Carry,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run_layers(block: Block, x_BTD: jax.Array, key: jax.Array) -> jax.Array:
      return layer(block, x_BTD, key)

    x_BTD = run_layers(self.layers, x_BTD, keys_L)
    return self.final_norm(x_BTD)

  def classifier(self) -> tuple[jax.Array, str]:
    """The output layer's weight in the compute dtype and its ``classifier_layout``.

    Returns:
      ``(embedding (V, D), "vd")`` with tied embeddings, else ``(kernel (D, V), "dv")``: the
      head kernel is read in place, never transposed.
    """
    dtype = _dtype(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...].astype(dtype), "vd"
    return self.head.kernel[...].astype(dtype), "dv"
