"""A byte-level BPE tokenizer (HF ``tokenizers``) trained on the corpus; text to a token stream.

Byte-level: any text encodes (no unknown token) and ``decode(encode(text))`` gives the text back.
The only special token is ``EOT``, id 0, written after every document; a literal "<|endoftext|>"
inside a text is encoded as ordinary text, so EOT ids in a stream are always separators.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
# Text pieces handed to one `encode_batch` call (tokenizers parallelizes over them).
_ENCODE_BATCH = 32


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE tokenizer of at most ``vocab_size`` entries (EOT included) on
  ``texts``.

  The vocabulary can come out smaller when the text has fewer distinct merges; read the real
  size with ``get_vocab_size()``.
  """
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOT],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.encode_special_tokens = True
  return tokenizer


def load(path: str) -> Tokenizer:
  """The tokenizer saved at ``path`` (tokenizer.json), encoding "<|endoftext|>" in text as text."""
  tokenizer = Tokenizer.from_file(path)
  tokenizer.encode_special_tokens = True
  return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
  """The id of ``EOT``. Raises ValueError when the tokenizer lacks it."""
  token_id = tokenizer.token_to_id(EOT)
  if token_id is None:
    raise ValueError(f"tokenizer has no {EOT} token")
  return token_id


def encode_stream(tokenizer: Tokenizer, pieces: Iterable[tuple[str, bool]]) -> Iterator[np.ndarray]:
  """Token ids of ``pieces`` (``(text, ends_document)``, see ``corpus.iter_documents``), in order.

  Yields int64 1-D arrays whose concatenation is the stream: each document's tokens followed by
  the EOT id. Pieces of one document are encoded separately (they are cut at line ends).
  """
  eot = np.array([eot_id(tokenizer)], np.int64)
  pieces = iter(pieces)
  while batch := list(itertools.islice(pieces, _ENCODE_BATCH)):
    encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
    for (_, ends_document), encoding in zip(batch, encodings, strict=True):
      yield np.asarray(encoding.ids, np.int64)
      if ends_document:
        yield eot
