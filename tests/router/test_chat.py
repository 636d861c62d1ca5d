"""Chat requests: the DeepSeek-V3.1/V3.2 format, message parsing, the Frontend's tokenization of a
chat (one BOS, markers as single ids), and chats over gRPC on a real server (conftest ``server``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import tokenizers

from router import wire
from router.backend import ModelInfo
from router.chat import ChatMessage, parse_messages, render_chat
from router.client import Client
from router.frontend import CompletionRequest, Frontend
from router.limits import RequestLimits
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc
from router.tokenizer import TOKENIZER_FILE, Tokenizer
from tests.router.conftest import MAX_MODEL_LEN, ServerThread
from workers.engine.types import RequestError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "2+2?"),
    ChatMessage("assistant", "4"),
    ChatMessage("user", "And 3+3?"),
)
# DeepSeek-V3.1's model card, "Multi-Turn" and "Thinking" (V3.2's encoding_dsv32 gives the same).
CHAT_TEXT = f"{BOS}You are terse.<｜User｜>2+2?<｜Assistant｜></think>4{EOS}<｜User｜>And 3+3?<｜Assistant｜>"
GREEDY = {"max_tokens": 4, "ignore_eos": True}


# ---- the format -----------------------------------------------------------------------------


@pytest.mark.parametrize("thinking, opener", [(False, "</think>"), (True, "<think>")], ids=["no-think", "think"])
def test_multi_turn_chat_renders_in_the_documented_format(thinking: bool, opener: str) -> None:
    assert render_chat(CHAT, thinking=thinking) == CHAT_TEXT + opener


def test_format_details_follow_the_v31_template() -> None:
    msgs = (
        ChatMessage("user", "hi"),
        ChatMessage("system", "A"),  # every system message goes after BOS, joined by a blank line
        ChatMessage("assistant", "let me think</think>Hello"),  # reasoning is dropped
        ChatMessage("system", "B"),
    )
    assert render_chat(msgs) == f"{BOS}A\n\nB<｜User｜>hi<｜Assistant｜></think>Hello{EOS}"
    # No generation prompt unless the last turn is a user's, or when it is not asked for.
    assert render_chat(msgs[:1], add_generation_prompt=False) == f"{BOS}<｜User｜>hi"
    assert render_chat((ChatMessage("system", "S"),)) == f"{BOS}S"


def test_parse_messages_accepts_openai_shapes() -> None:
    msgs = parse_messages([
        {"role": "system", "content": "S", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ])
    assert msgs == (ChatMessage("system", "S"), ChatMessage("user", "a\nb"))
    assert ChatMessage.from_json(msgs[1].to_json()) == msgs[1]


@pytest.mark.parametrize(
    "value, needle",
    [
        ([], "empty"),
        ("hi", "list"),
        (["hi"], "[0] a message must be an object"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], "[1] unknown role 'tool'"),
        ([{"content": "x"}], "role must be a string"),
        ([{"role": "user", "content": 3}], "content must be"),
        ([{"role": "assistant", "content": None}], "content must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        ([{"role": "user", "content": "a", "tool_calls": []}], "unsupported key 'tool_calls'"),
    ],
    ids=["empty", "not-a-list", "not-an-object", "unknown-role", "no-role", "int-content", "null-content",
         "image-part", "tool-calls"],
)
def test_parse_errors_name_messages_and_the_problem(value: object, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_messages(value)
    assert info.value.field == "messages" and needle in str(info.value)


# ---- the Frontend ---------------------------------------------------------------------------


class InfoOnly:
    """A backend for ``Frontend.prepare``, which needs only ``info()``."""

    def info(self) -> ModelInfo:
        return ModelInfo("tiny", 129280, MAX_MODEL_LEN, MAX_MODEL_LEN, 8, 64, 1, 0, 32, True,
                         RequestLimits().resolved(max_context=MAX_MODEL_LEN, max_queue=8))


@pytest.mark.parametrize("add_bos", [False, True], ids=["config-no-bos", "config-bos"])
def test_frontend_tokenizes_a_chat_with_one_bos(tiny_dir: Path, add_bos: bool) -> None:
    backend = tokenizers.Tokenizer.from_file(str(tiny_dir / TOKENIZER_FILE))
    tok = Tokenizer(backend, bos_token_id=0, eos_token_id=1, add_bos=add_bos)
    frontend = Frontend(InfoOnly(), tok)  # type: ignore[arg-type]
    ids = frontend.prepare(CompletionRequest(messages=CHAT, thinking=True)).prompt_token_ids
    text = render_chat(CHAT, thinking=True)
    assert list(ids) == tok.encode(text) == tok.encode(text, add_bos=False)
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(1) == 1  # one BOS, one EOS (the turn's)
    markers = ["<｜User｜>", "<｜Assistant｜>", "</think>", "<think>"]
    marker_ids = [backend.token_to_id(m) for m in markers]
    assert None not in marker_ids and [ids.count(i) for i in marker_ids] == [2, 2, 1, 1]  # whole, not split
    assert ids[-1] == backend.token_to_id("<think>")


def test_frontend_request_shape_errors(tokenizer: Tokenizer, no_tokenizer_dir: Path) -> None:
    frontend = Frontend(InfoOnly(), tokenizer)  # type: ignore[arg-type]
    for req, field in [
        (CompletionRequest(prompt="a", messages=CHAT), "messages"),
        (CompletionRequest(prompt_ids=(5,), messages=CHAT), "messages"),
        (CompletionRequest(messages=(ChatMessage("robot", "x"),)), "messages"),
        (CompletionRequest(messages=()), "messages"),
    ]:
        with pytest.raises(RequestError) as info:
            frontend.prepare(req)
        assert info.value.field == field, req
    with pytest.raises(RequestError) as info:
        Frontend(InfoOnly(), Tokenizer.load(no_tokenizer_dir)).prepare(CompletionRequest(messages=CHAT))  # type: ignore[arg-type]
    assert info.value.field == "messages" and "prompt_ids" in str(info.value)


def test_from_json_reads_messages_and_thinking() -> None:
    req = CompletionRequest.from_json({"messages": [m.to_json() for m in CHAT], "thinking": True, "max_tokens": 2})
    assert req.messages == CHAT and req.thinking and req.prompt is None
    for bad in ({"messages": []}, {"messages": [{"role": "x", "content": ""}]}, {"thinking": "yes"}):
        with pytest.raises(RequestError) as info:
            CompletionRequest.from_json(bad)
        assert info.value.field == next(iter(bad))


def test_wire_round_trip_keeps_the_chat() -> None:
    req = CompletionRequest(messages=CHAT, thinking=True)
    msg = wire.request_to_proto(req)
    assert msg.WhichOneof("prompt") == "messages"
    back = wire.request_from_proto(msg)
    assert back.messages == CHAT and back.thinking and back.prompt is None and back.prompt_ids is None


# ---- over gRPC ------------------------------------------------------------------------------


def test_generate_with_messages_equals_the_rendered_prompt_ids(server: ServerThread, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(render_chat(CHAT), add_bos=False)
    with Client(server.address, timeout=60) as c:
        chat = c.generate(messages=[m.to_json() for m in CHAT], **GREEDY)
        same = c.generate(prompt_ids=ids, **GREEDY)
        thinking = c.generate(messages=CHAT, thinking=True, **GREEDY)
    assert chat.token_ids == same.token_ids and len(chat.token_ids) == 4
    assert chat.usage.prompt_tokens == len(ids) == thinking.usage.prompt_tokens


def test_tokenize_and_generate_render_chats_alike(server: ServerThread, tokenizer: Tokenizer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DsaServeStub(channel)
        for thinking in (False, True):
            msg = wire.tokenize_request_to_proto(messages=CHAT, thinking=thinking, add_bos=True)
            got = list(stub.Tokenize(msg, timeout=30).token_ids)
            assert got == tokenizer.encode(render_chat(CHAT, thinking=thinking), add_bos=False)
        assert got.count(tokenizer.bos_token_id) == 1
        bad = [
            wire.tokenize_request_to_proto("text too", messages=CHAT),
            wire.tokenize_request_to_proto(messages=(ChatMessage("robot", "x"),)),
            pb.GenerateRequest(messages=wire.chat_to_proto((ChatMessage("robot", "x"),)), max_tokens=2),
        ]
        for i, req in enumerate(bad):
            call = stub.Tokenize if i < 2 else stub.Generate
            with pytest.raises(grpc.RpcError) as info:
                list(call(req, timeout=30)) if i == 2 else call(req, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("messages: "), info.value.details()
