"""The errors a user fixes (the message says how): ``python -m train`` prints one line, exit 2.

:class:`train.config.ConfigError` (a bad key or value, also the data layer's) is the other such
error; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunError(Exception):
  """A run that cannot go on for a reason outside the code: a locked or unwritable workdir, no
  checkpoint that restores, a damaged metrics file, a loss that stays non-finite."""
