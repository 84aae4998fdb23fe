"""The docs name the RPCs and messages of the proto as the proto defines them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "appliance" / "v1" / "appliance.proto"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `Rpc(Request) returns (Response)`, with "stream" before either message where it streams.
SIGNATURE = re.compile(
    r"(?:rpc )?(\w+)\((?:stream )?(\w+)\) returns \((?:stream )?(\w+)\)", re.MULTILINE
)


def proto_signatures() -> dict[str, tuple[str, str]]:
    """Return each RPC of the proto with its request and response message names."""
    matches = SIGNATURE.findall(PROTO.read_text())
    return {rpc: (request, response) for rpc, request, response in matches}


def test_proto_signatures_are_parsed() -> None:
    signatures = proto_signatures()
    assert signatures["Generate"] == ("GenerateRequest", "GenerateResponse")
    assert signatures["Validate"] == ("ValidateRequest", "ValidateResponse")


def test_doc_signatures_match_proto() -> None:
    signatures = proto_signatures()
    messages = set(re.findall(r"^message (\w+)", PROTO.read_text(), re.MULTILINE))
    checked = 0
    for path in DOCS:
        text = path.read_text()
        for rpc, request, response in SIGNATURE.findall(text):
            where = f"{path.relative_to(ROOT)}: {rpc}({request}) returns ({response})"
            assert rpc in signatures, f"{where}: the proto has no RPC {rpc}"
            assert (request, response) == signatures[rpc], (
                f"{where}: the proto says {signatures[rpc]}"
            )
            checked += 1
        for name in re.findall(r"`(\w+(?:Request|Response|Reply|Chunk))`", text):
            assert name in messages, f"{path.relative_to(ROOT)}: `{name}` is not a proto message"
    assert checked >= 2
