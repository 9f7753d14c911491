"""``python -m train [CONFIG.yaml] [key=value ...]`` (also installed as ``cce-train``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m train [CONFIG.yaml] [key=value ...]

Trains the language model of CONFIG.yaml (default: configs/default.yaml), with each
key=value overriding one config entry (dotted keys for nested ones: model.num_layers=2).
A workdir holding checkpoints resumes from the newest that restores; so does
`python -m train WORKDIR/config.yaml` (the config the run stored there).
SIGTERM or Ctrl-C saves a checkpoint and stops; the workdir is locked while a run uses it.
"""


# What `pip install cce-jax` without extras lacks; the message names the extra that brings it.
MISSING_EXTRA = (
  "the trainer needs the 'train' extra (missing module {name!r}): "
  "pip install 'cce-jax[train]' (from a checkout: pip install '.[train]')"
)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the trainer; the exit status.

  0: done, also after a SIGTERM/SIGINT checkpoint; 2: a bad config, a missing ``train`` extra
  or a run that cannot go on for a reason the user fixes (one line on stderr, no traceback:
  ``ConfigError``, ``RunError``); 130: a second Ctrl-C. Anything else is a bug and keeps its
  traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    from train import config, distributed, trainer
    from train.errors import RunError
  except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] in ("train", "cce_jax"):
      raise
    print(MISSING_EXTRA.format(name=error.name), file=sys.stderr)
    return 2
  if any(arg in ("-h", "--help") for arg in argv):
    print(USAGE + "\nkeys: " + ", ".join(config.valid_keys()))
    return 0
  path = argv.pop(0) if argv and "=" not in argv[0] else None

  try:
    cfg = config.load(path, argv)
    distributed.initialize(cfg.distributed)
    result = trainer.run(cfg)
  except config.ConfigError as error:
    print(f"config error: {error}", file=sys.stderr)
    return 2
  except RunError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted (the in-flight checkpoint saves were completed)", file=sys.stderr)
    return 130
  import jax

  if result.history and jax.process_index() == 0:
    last = result.history[-1]
    summary = f"step {result.step}: loss {last['loss']:.4f}"
    if "eval_loss" in last:
      summary += f", eval loss {last['eval_loss']:.4f}"
    print(summary + f" ({result.workdir})")
  return 0
