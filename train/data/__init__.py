"""The LM trainer's data: prepare token files once (cached), then serve packed batches with Grain.

prepared = prepare(DataConfig())                       # stdlib source, 32k byte-level BPE
loader = make_loader(prepared, split="train", seq_len=256, global_batch_size=32, seed=0)
for batch in loader: batch["tokens"]                   # (32, 256) int32
"""

from train.data.config import DataConfig, PreparedData
from train.data.pipeline import make_loader
from train.data.prepare import load_tokenizer, prepare
from train.data.tokenizer import EOT

__all__ = ["EOT", "DataConfig", "PreparedData", "load_tokenizer", "make_loader", "prepare"]
