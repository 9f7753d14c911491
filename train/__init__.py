"""A Flax NNX language-model trainer whose loss is ``cce_jax.linear_cross_entropy``.

Run it with ``python -m train [CONFIG.yaml] [key=value ...]`` (or ``cce-train``). Modules, one
job each: ``config`` (dataclasses, YAML, overrides), ``model`` (the NNX transformer),
``sharding`` (mesh, logical axes), ``loss`` (the one loss call), ``optimizer`` (optax),
``step`` (the jitted train/eval steps), ``checkpoint`` (Orbax), ``metrics`` (console, JSONL,
TensorBoard, plot), ``progress`` (tokens/s, MFU, ETA, plain log lines), ``hardware`` (the
``hardware`` section, chips' peak FLOP/s, model FLOPs), ``preflight`` (data and memory checks
before a run), ``distributed`` (multi-host), ``trainer`` (the loop), ``cli``, ``aot``
(compile a config ahead of time, report its memory and whether it fits); ``data``
(Grain pipeline and tokenizer) lives in ``train/data/``.
"""
