"""The daemons' wire protocol (virnucpro.serving.protocol): what a daemon accepts, what it refuses, the
typed embed request and the request ID. No sockets."""

from __future__ import annotations

import json
import os

import pytest

from virnucpro.serving.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_TEXT,
    EmbedRequest,
    Op,
    ProtocolError,
    Reply,
    State,
    decode_reply,
    encode,
    kind_of,
    parse_request,
    request_id,
)


def parse(message: object) -> dict:
    return parse_request([json.dumps(message).encode()])


@pytest.mark.parametrize(
    "message",
    [
        {"op": "ping"},
        {"op": "status"},
        {"op": "stop"},
        {"op": "embed", "input": "/d/a.faa", "output": "/d/a.pt"},
        {"op": "embed", "input": "/d/a.faa", "output": "/d/a.pt", "sample": "s", "shard": "shard_00001"},
        {"op": "embed", "input": "/d/a", "output": "/d/a.pt", "request_id": "ab" * 32, "timeout": 0, "attempt": 1000},
        {"op": "embed", "input": "/d/a.faa", "output": "/d/a.pt", "fingerprint": "0123abcd"},
        {"op": "embed", "input": "/d/a.faa", "output": "/d/a.pt", "timeout": 1e9, "attempt": 1, "sample": None},
        {"op": "embed", "input": "/d/a.faa", "output": "/d/a.pt", "timeout": 2.5, "shard": "x" * MAX_TEXT},
    ],
)
def test_well_formed_requests_are_accepted_with_their_op_as_an_op(message):
    parsed = parse(message)
    assert parsed["op"] is Op(message["op"])
    assert {key: value for key, value in parsed.items() if key != "op"} == {
        key: value for key, value in message.items() if key != "op"
    }


@pytest.mark.parametrize(
    "frames, complaint",
    [
        ([], "one frame"),
        ([b'{"op": "ping"}', b'{"op": "ping"}'], "one frame"),
        ([b"x" * (MAX_MESSAGE_BYTES + 1)], "over the limit"),
        ([b"\xff\xfe"], "not UTF-8 JSON"),
        ([b"{"], "not UTF-8 JSON"),
        ([b"[" * 60000], "not UTF-8 JSON"),
        ([b"[1, 2]"], "JSON object"),
        ([b'"ping"'], "JSON object"),
        ([b"{}"], "unknown op"),
        ([b'{"op": "Ping"}'], "unknown op"),
        ([b'{"op": ["ping"]}'], "unknown op"),
        ([b'{"op": "ping", "x": 1}'], "unknown field"),
        ([b'{"op": "stop", "input": "/a"}'], "unknown field"),
        ([b'{"op": "embed", "output": "/a.pt"}'], "'input' is required"),
        ([b'{"op": "embed", "input": "", "output": "/a.pt"}'], "'input' must be a non-empty string"),
        ([b'{"op": "embed", "input": 5, "output": "/a.pt"}'], "'input'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "sample": {"nested": true}}'], "'sample'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "timeout": NaN}'], "'timeout'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "timeout": Infinity}'], "'timeout'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "timeout": 1e10}'], "'timeout'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "timeout": "5"}'], "'timeout'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "attempt": true}'], "'attempt'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "attempt": 1001}'], "'attempt'"),
        ([b'{"op": "embed", "input": "/a", "output": "/a.pt", "fingerprint": 7}'], "'fingerprint'"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(frames, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        parse_request(frames)


def test_an_embed_request_round_trips_through_its_message():
    full = EmbedRequest(input="/d/a.faa", output="/d/a.pt", sample="s1", shard="shard_00002", timeout=12.5, attempt=2,
                        fingerprint="0123abcd", request_id="ab" * 32)  # fmt: skip
    bare = EmbedRequest(input="/d/b.faa", output="/d/b.pt")
    for request in (full, bare):
        message = request.to_message()
        assert message["op"] == "embed"
        frame = encode(message)
        assert len(frame) <= MAX_MESSAGE_BYTES
        assert EmbedRequest.from_message(parse_request([frame])) == request
    assert "timeout" not in bare.to_message() and "fingerprint" not in bare.to_message()  # unset: not sent


def test_reply_kinds_are_read_back_and_unknown_ones_are_none():
    for kind in Reply:
        assert kind_of({"reply": kind.value}) is kind
    assert kind_of({"reply": "surprise"}) is None and kind_of({}) is None
    assert decode_reply(b"not json") == {"reply": "error", "message": "unreadable reply from the daemon"}
    assert kind_of(decode_reply(b"[1]")) is Reply.ERROR
    assert decode_reply(encode({"reply": "pong", "state": State.READY.value})) == {"reply": "pong", "state": "ready"}
    assert [state.value for state in State] == ["loading", "ready", "stopping", "failed"]


def test_the_request_id_names_the_shard_version_the_model_and_the_parameters(tmp_path):
    shard = tmp_path / "a.faa"
    shard.write_text(">a\nMKV\n")
    os.utime(shard, ns=(1_000_000_000, 1_000_000_000))
    output = tmp_path / "a.pt"
    rid = request_id("esm2", "f1", "fp32", str(shard), str(output))
    assert len(rid) == 64 and rid == request_id("esm2", "f1", "fp32", str(shard), str(output))
    (tmp_path / "link.faa").symlink_to(shard)
    assert request_id("esm2", "f1", "fp32", str(tmp_path / "link.faa"), str(output)) == rid  # real paths
    others = {
        request_id("dnabert_s", "f1", "fp32", str(shard), str(output)),
        request_id("esm2", "f2", "fp32", str(shard), str(output)),  # another model file
        request_id("esm2", "f1", "bf16", str(shard), str(output)),
        request_id("esm2", "f1", "fp32", str(shard), str(tmp_path / "b.pt")),
    }
    assert rid not in others and len(others) == 4
    os.utime(shard, ns=(2_000_000_000, 2_000_000_000))  # the shard file changed
    assert request_id("esm2", "f1", "fp32", str(shard), str(output)) != rid
