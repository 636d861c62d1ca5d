"""The served model's tokenizer: text ↔ token ids, and incremental detokenization for streaming.

A checkpoint directory holds ``tokenizer.json`` (HF ``tokenizers`` format; DeepSeek V3's byte-level
BPE) and optionally ``tokenizer_config.json`` (special tokens, ``add_bos_token``). Without
``tokenizer.json`` the server serves token ids only and leaves text empty, as vLLM does with
``skip_tokenizer_init``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# Tokens of the prompt decoded together with the first generated token, so that the first delta is
# decoded in context (vLLM uses the same window).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Encodes and decodes with a ``tokenizers.Tokenizer`` plus DeepSeek's special-token conventions.

    Args:
        backend: the loaded ``tokenizers.Tokenizer``.
        bos_token_id / eos_token_id: ids of the begin/end-of-sentence tokens (None when unknown).
        add_bos: whether ``encode`` prepends ``bos_token_id`` by default (``add_bos_token``).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
    ) -> None:
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos and bos_token_id is not None

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it has no ``tokenizer.json``.

        ``add_bos`` follows ``tokenizer_config.json``'s ``add_bos_token`` and defaults to True (DeepSeek's
        released V3/V3.2 configs set it). Special tokens come from that file's ``bos_token`` and
        ``eos_token``, falling back to DeepSeek's names.
        """
        root = Path(model_dir)
        path = root / TOKENIZER_FILE
        if not path.is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path))
        config: dict = {}
        if (root / CONFIG_FILE).is_file():
            config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
        bos = _special_id(backend, config.get("bos_token"), "<｜begin▁of▁sentence｜>")
        eos = _special_id(backend, config.get("eos_token"), "<｜end▁of▁sentence｜>")
        return cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos=bool(config.get("add_bos_token", True)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos`` None means the tokenizer's default."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        # A text that already starts with the bos token (templated chats do) gets no second one.
        if (self.add_bos if add_bos is None else add_bos) and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped by default, as vLLM's outputs)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's generated tokens."""
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns generated tokens into text deltas that never split a multi-byte character.

    The prefix-offset method of HF/vLLM: keep a window ``ids[prefix:read]`` already emitted; decode
    ``ids[prefix:]`` and emit what it adds beyond ``decode(ids[prefix:read])``, unless the new text
    ends in U+FFFD — a character whose bytes have not all arrived — in which case wait for more tokens.
    Decoding a short window (not the whole sequence) keeps each step O(1), and decoding it together
    with earlier tokens gives the right spacing and merges bytes across token boundaries.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._num_context = len(context)
        self.text = ""  # all text emitted so far

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens pushed so far (prompt context excluded)."""
        return self._ids[self._num_context :]

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated tokens; returns the text they complete (possibly empty)."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (an incomplete character decodes
        as U+FFFD, as a full decode would show it)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


def _special_id(backend: tokenizers.Tokenizer, entry: object, default: str) -> int | None:
    """Id of a special token given as tokenizer_config stores it (a string or an AddedToken dict)."""
    content = entry.get("content") if isinstance(entry, dict) else entry
    return backend.token_to_id(content if isinstance(content, str) else default)
