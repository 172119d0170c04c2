#!/usr/bin/env python3
"""Drives embgate with real Python clients: the official `openai` SDK and
`langchain_openai.OpenAIEmbeddings`.

Every vector a client gets through the gateway must equal, as float32, the
vector the vendor returns when asked directly. The embedding calls run twice;
the second run must be answered from the cache only (checked on /metrics).

Environment:
  GATEWAY_URL  e.g. http://127.0.0.1:8080 (no /v1)
  VENDOR_URL   e.g. http://127.0.0.1:9000/v1 (as printed by fake-vendor)

Prints one `PASS name` or `FAIL name: detail` line per check and exits 1 if
any check failed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import traceback
import urllib.request
from array import array
from typing import Any, Callable

GATEWAY = os.environ["GATEWAY_URL"].rstrip("/")
VENDOR = os.environ["VENDOR_URL"].rstrip("/")
API_KEY = "sk-test"

from langchain_openai import OpenAIEmbeddings  # noqa: E402
from openai import OpenAI  # noqa: E402
from openai.resources.embeddings import Embeddings as _EmbeddingsResource  # noqa: E402

failures = 0


def report(name: str, fn: Callable[[], None]) -> None:
    global failures
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a FAIL line
        failures += 1
        detail = f"{type(e).__name__}: {e}"
        response = getattr(e, "response", None)
        if response is not None:
            try:
                detail += f" [HTTP {response.status_code}: {response.text[:500]}]"
            except Exception:  # noqa: BLE001
                pass
        print(f"FAIL {name}: {detail}", flush=True)
        traceback.print_exc(file=sys.stderr)
    else:
        print(f"PASS {name}", flush=True)


# ---------------------------------------------------------------- helpers


def http(method: str, url: str, body: Any = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


def f32(values: Any) -> array:
    """float32 view of a vector: a list of floats (rounded to float32) or a
    base64 string of little-endian float32 values."""
    if isinstance(values, str):
        out = array("f")
        out.frombytes(base64.b64decode(values))
        if sys.byteorder != "little":
            out.byteswap()
        return out
    return array("f", values)


_direct_cache: dict[str, list[array]] = {}


def vendor_direct(model: str, inputs: Any, dimensions: int | None = None) -> list[array]:
    """The vectors the vendor itself returns, asked directly in both
    encodings; the two must agree."""
    key = json.dumps([model, inputs, dimensions])
    if key in _direct_cache:
        return _direct_cache[key]
    answers = {}
    for encoding in ("base64", "float"):
        body: dict[str, Any] = {"model": model, "input": inputs, "encoding_format": encoding}
        if dimensions is not None:
            body["dimensions"] = dimensions
        doc = json.loads(http("POST", f"{VENDOR}/embeddings", body))
        data = sorted(doc["data"], key=lambda d: d["index"])
        answers[encoding] = [f32(d["embedding"]) for d in data]
    if answers["base64"] != answers["float"]:
        raise AssertionError(f"vendor disagrees with itself between base64 and float for {key}")
    _direct_cache[key] = answers["base64"]
    return answers["base64"]


def compare(what: str, got: list[list[float]], expected: list[array]) -> None:
    if len(got) != len(expected):
        raise AssertionError(f"{what}: {len(got)} vectors, expected {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected)):
        g32 = f32(g)
        if len(g32) != len(e):
            raise AssertionError(f"{what}: vector {i} has {len(g32)} values, expected {len(e)}")
        if g32 != e:
            diffs = [j for j in range(len(e)) if g32[j] != e[j]]
            j = diffs[0]
            raise AssertionError(
                f"{what}: vector {i} differs from the vendor's in {len(diffs)} of {len(e)} "
                f"values; first at [{j}]: got {g32[j]!r}, vendor {e[j]!r}"
            )


def lookups() -> dict[str, float]:
    text = http("GET", f"{GATEWAY}/metrics").decode()
    totals = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if not line.startswith("embgate_cache_lookups_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        m = re.search(r'result="([^"]*)"', labels)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(value)
    return totals


# Record what the SDK is asked to send, to prove LangChain sends token arrays.
_sent_inputs: list[Any] = []
_original_create = _EmbeddingsResource.create


def _recording_create(self: Any, *args: Any, **kwargs: Any) -> Any:
    _sent_inputs.append(kwargs.get("input"))
    return _original_create(self, *args, **kwargs)


_EmbeddingsResource.create = _recording_create  # type: ignore[method-assign]

client = OpenAI(base_url=f"{GATEWAY}/v1", api_key=API_KEY, max_retries=0, timeout=60)
lc = OpenAIEmbeddings(
    model="text-embedding-3-small", base_url=f"{GATEWAY}/v1", api_key=API_KEY, max_retries=0
)

SINGLE = "The quick brown fox jumps over the lazy dog."
TEXTS = [
    "hello world",
    "naïve café ☕ — ünïcödé, 日本語のテキスト",
    "line one\nline two\ttabbed  and  spaced",
    "<|endoftext|> is ordinary text when embedded",
    "hello world",
]
TOKENS = [[9906, 1917], [1, 2, 3, 4, 5], [100255]]
LC_DOCS = [
    "LangChain tokenises this document with tiktoken before sending it.",
    "Second document: short.",
    "naïve café ☕",
]
LC_QUERY = "what does the gateway cache?"


# ---------------------------------------------------------------- checks


def sdk_single_base64() -> None:
    resp = client.embeddings.create(model="text-embedding-3-small", input=SINGLE)
    assert resp.model == "text-embedding-3-small", resp.model
    compare("single string, base64", [d.embedding for d in resp.data],
            vendor_direct("text-embedding-3-small", SINGLE))


def sdk_list_base64() -> None:
    resp = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert [d.index for d in resp.data] == list(range(len(TEXTS))), [d.index for d in resp.data]
    compare("list, base64", [d.embedding for d in resp.data],
            vendor_direct("text-embedding-3-small", TEXTS))


def sdk_list_float() -> None:
    resp = client.embeddings.create(
        model="text-embedding-ada-002", input=TEXTS, encoding_format="float"
    )
    compare("list, float", [d.embedding for d in resp.data],
            vendor_direct("text-embedding-ada-002", TEXTS))


def sdk_dimensions() -> None:
    resp = client.embeddings.create(model="text-embedding-3-large", input=TEXTS[:3], dimensions=256)
    assert all(len(d.embedding) == 256 for d in resp.data)
    compare("dimensions=256", [d.embedding for d in resp.data],
            vendor_direct("text-embedding-3-large", TEXTS[:3], 256))


def sdk_tokens() -> None:
    resp = client.embeddings.create(model="text-embedding-3-small", input=TOKENS)
    compare("token arrays", [d.embedding for d in resp.data],
            vendor_direct("text-embedding-3-small", TOKENS))


def sdk_other_vendor_model() -> None:
    resp = client.embeddings.create(model="acme-embed-v1", input=TEXTS, encoding_format="float")
    compare("acme-embed-v1", [d.embedding for d in resp.data], vendor_direct("acme-embed-v1", TEXTS))


def langchain_documents() -> None:
    _sent_inputs.clear()
    got = lc.embed_documents(LC_DOCS)
    sent = list(_sent_inputs)
    assert sent, "LangChain made no embeddings call"
    for batch in sent:
        assert isinstance(batch, list) and all(
            isinstance(item, list) and all(isinstance(t, int) for t in item) for item in batch
        ), f"LangChain did not send token arrays: {batch!r:.200}"
    # The vendor derives vectors from cl100k token ids, so the text's vector
    # is the one its token array must get.
    compare("langchain embed_documents", got, vendor_direct("text-embedding-3-small", LC_DOCS))


def langchain_query() -> None:
    _sent_inputs.clear()
    got = lc.embed_query(LC_QUERY)
    assert _sent_inputs and isinstance(_sent_inputs[0][0], list), (
        f"LangChain did not send token arrays: {_sent_inputs!r:.200}"
    )
    compare("langchain embed_query", [got], vendor_direct("text-embedding-3-small", [LC_QUERY]))


EMBEDDING_CHECKS = [
    ("openai sdk: one string, default base64", sdk_single_base64),
    ("openai sdk: list with a duplicate, default base64", sdk_list_base64),
    ("openai sdk: list, encoding_format=float", sdk_list_float),
    ("openai sdk: dimensions=256", sdk_dimensions),
    ("openai sdk: token arrays", sdk_tokens),
    ("openai sdk: acme-embed-v1", sdk_other_vendor_model),
    ("langchain: embed_documents (token arrays)", langchain_documents),
    ("langchain: embed_query (token arrays)", langchain_query),
]


def models_list() -> None:
    ids = {m.id for m in client.models.list()}
    for want in ("text-embedding-3-small", "gpt-4o-mini"):
        assert want in ids, f"{want} missing from {sorted(ids)}"


def chat_stream() -> None:
    message = "please stream these words back to me one at a time"
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": message}], stream=True
    )
    chunks = 0
    pieces: list[str] = []
    content_times: list[float] = []
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                content_times.append(time.monotonic() - started)
    assert chunks > 2, f"only {chunks} chunks"
    assert len(pieces) > 2, f"only {len(pieces)} chunks with content"
    assert "".join(pieces) == message, f"content {''.join(pieces)!r}, expected {message!r}"
    # The vendor spaces its chunks 30 ms apart: a gateway that forwards them
    # as they come delivers them spread out, one that buffers delivers them
    # all at once.
    spread = content_times[-1] - content_times[0]
    assert spread >= 0.1, f"{len(pieces)} content chunks arrived within {spread * 1000:.0f} ms"


def main() -> int:
    report("python openai sdk: models.list", models_list)
    report("python openai sdk: streamed chat completion", chat_stream)

    before = lookups()
    for name, fn in EMBEDDING_CHECKS:
        report(f"python {name} (run 1)", fn)
    after_first = lookups()
    for name, fn in EMBEDDING_CHECKS:
        report(f"python {name} (run 2)", fn)
    after_second = lookups()

    def first_run_missed() -> None:
        assert after_first["miss"] > before["miss"], f"misses {before} -> {after_first}"

    def second_run_all_hits() -> None:
        assert after_second["miss"] == after_first["miss"], (
            f"second run had {after_second['miss'] - after_first['miss']:g} misses "
            f"(lookups {after_first} -> {after_second})"
        )
        assert after_second["hit"] > after_first["hit"], (
            f"second run had no hits (lookups {after_first} -> {after_second})"
        )

    report("python metrics: first run looked inputs up and missed", first_run_missed)
    report("python metrics: second run answered from the cache only", second_run_all_hits)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
