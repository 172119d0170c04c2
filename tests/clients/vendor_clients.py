#!/usr/bin/env python3
"""Drives embgate with the vendors' own Python SDKs, unchanged but for their
base URL: `cohere` (ClientV2, /v2/embed), `voyageai` (/v1/embeddings with
Voyage's fields), `google-genai` (batchEmbedContents under /v1) and `boto3`
(bedrock-runtime InvokeModel, SigV4-signed).

Every vector an SDK gets through the gateway must equal, value for value, the
one the vendor's fake returns when asked directly; every call runs twice and
the second run must be answered from the cache only (checked on /metrics).

Environment:
  GATEWAY_URL  e.g. http://127.0.0.1:8080
  VENDOR_URL   e.g. http://127.0.0.1:9000/v1 (as printed by fake-vendor)

Prints one `PASS name` or `FAIL name: detail` line per check and exits 1 if
any check failed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import urllib.request
from array import array
from typing import Any, Callable

GATEWAY = os.environ["GATEWAY_URL"].rstrip("/")
VENDOR_HOST = re.sub(r"/v1/?$", "", os.environ["VENDOR_URL"].rstrip("/"))

import boto3  # noqa: E402
import cohere  # noqa: E402
import voyageai  # noqa: E402
from google import genai  # noqa: E402
from google.genai import types  # noqa: E402

failures = 0


def report(name: str, fn: Callable[[], None]) -> None:
    global failures
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a FAIL line
        failures += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(file=sys.stderr)
    else:
        print(f"PASS {name}", flush=True)


def post(url: str, body: Any, headers: dict[str, str]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def lookups() -> dict[str, float]:
    with urllib.request.urlopen(f"{GATEWAY}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    totals = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("embgate_cache_lookups_total{"):
            labels, value = line.rsplit(" ", 1)
            m = re.search(r'result="([^"]*)"', labels)
            if m:
                totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(value)
    return totals


def same(what: str, got: Any, expected: Any, floats: bool) -> None:
    got = [list(v) for v in got]
    expected = [list(v) for v in expected]
    if floats:
        got = [array("f", v) for v in got]
        expected = [array("f", v) for v in expected]
    if got != expected:
        raise AssertionError(f"{what}: the vectors differ from the vendor's")


def twice(what: str, call: Callable[[], Any], expected: Any, floats: bool = True) -> None:
    """The call on a cold cache, then again: the same vectors, all hits."""
    same(f"{what} (first)", call(), expected, floats)
    before = lookups()
    same(f"{what} (again)", call(), expected, floats)
    after = lookups()
    if after["miss"] != before["miss"] or after["hit"] <= before["hit"]:
        raise AssertionError(f"{what}: the second call was not served from the cache")


TEXTS = ["The quick brown fox", "jumps over the lazy dog", "déjà vu ✓"]


def cohere_checks() -> None:
    client = cohere.ClientV2(api_key="co-test", base_url=GATEWAY)
    direct = post(
        f"{VENDOR_HOST}/v2/embed",
        {"model": "embed-v4.0", "texts": TEXTS, "input_type": "search_query",
         "embedding_types": ["float", "int8"], "output_dimension": 512},
        {"Authorization": "Bearer co-test"},
    )["embeddings"]

    def embed(kind: str) -> Callable[[], Any]:
        def call() -> Any:
            r = client.embed(texts=TEXTS, model="embed-v4.0", input_type="search_query",
                             embedding_types=[kind], output_dimension=512)
            return r.embeddings.float_ if kind == "float" else getattr(r.embeddings, kind)
        return call

    report("cohere float", lambda: twice("cohere float", embed("float"), direct["float"]))
    report("cohere int8", lambda: twice("cohere int8", embed("int8"), direct["int8"], floats=False))


def voyage_checks() -> None:
    client = voyageai.Client(api_key="pa-test", base_url=f"{GATEWAY}/v1")

    def direct(dtype: str) -> Any:
        body = {"model": "voyage-3.5", "input": TEXTS, "input_type": "document",
                "output_dimension": 256, "output_dtype": dtype}
        doc = post(f"{VENDOR_HOST}/voyage/v1/embeddings", body, {"Authorization": "Bearer pa-test"})
        return [d["embedding"] for d in sorted(doc["data"], key=lambda d: d["index"])]

    def embed(dtype: str) -> Callable[[], Any]:
        return lambda: client.embed(TEXTS, model="voyage-3.5", input_type="document",
                                    output_dimension=256, output_dtype=dtype).embeddings

    report("voyage float", lambda: twice("voyage float", embed("float"), direct("float")))
    report("voyage int8", lambda: twice("voyage int8", embed("int8"), direct("int8"), floats=False))


def gemini_checks() -> None:
    client = genai.Client(api_key="g-test",
                          http_options=types.HttpOptions(base_url=GATEWAY, api_version="v1"))
    model = "gemini-embedding-001"
    requests = [{"model": f"models/{model}", "content": {"parts": [{"text": t}]},
                 "taskType": "RETRIEVAL_DOCUMENT", "outputDimensionality": 768} for t in TEXTS]
    direct = post(f"{VENDOR_HOST}/v1beta/models/{model}:batchEmbedContents",
                  {"requests": requests}, {"x-goog-api-key": "g-test"})
    expected = [e["values"] for e in direct["embeddings"]]

    def embed() -> Any:
        config = types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT", output_dimensionality=768)
        r = client.models.embed_content(model=model, contents=TEXTS, config=config)
        return [e.values for e in r.embeddings]

    report("gemini batch", lambda: twice("gemini batch", embed, expected))


def bedrock_checks() -> None:
    def client(url: str) -> Any:
        return boto3.client("bedrock-runtime", endpoint_url=url, region_name="us-east-1",
                            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")

    def titan(c: Any) -> Callable[[], Any]:
        def call() -> Any:
            out = []
            for t in TEXTS:
                r = c.invoke_model(modelId="amazon.titan-embed-text-v2:0",
                                   body=json.dumps({"inputText": t, "dimensions": 512}))
                out.append(json.loads(r["body"].read())["embedding"])
            return out
        return call

    expected = titan(client(VENDOR_HOST))()
    report("bedrock titan", lambda: twice("bedrock titan", titan(client(GATEWAY)), expected))


cohere_checks()
voyage_checks()
gemini_checks()
bedrock_checks()
sys.exit(1 if failures else 0)
