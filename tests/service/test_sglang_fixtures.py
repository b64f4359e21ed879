"""The gateway in front of real SGLang 0.5.17 bytes: recorded responses replayed on loopback.

``tests/fixtures/sglang/*.json`` are exchanges captured on a GPU by ``tests/gpu/check_sglang_dflare.py``
(README there): SGLang with our DFLARE plugin (``usage.speculative`` from our hooks) and SGLang's own
DFLASH without the plugin (stats only in ``meta_info``). A replay server answers each recorded request
with the recorded status and body, streams event by event as ``text/event-stream``, so the gateway
hears SGLang's real wire format; it answers ``404`` to a request it has no recording for, which
also proves the gateway forwards what the user sent. SGLang's ``/health`` (an empty 200) is not
recorded and is answered the same way.

Oracles come from the recordings through ``SpecStats``, never from the gateway: what a user of the
gateway gets (body, ``x-dflare-*`` headers, relayed stream, metrics) must equal what SGLang sent,
and every recorded statistic must be self-consistent. ``DFLARE_FIXTURES_DIR`` points the test at
another folder of the same layout; an empty folder fails the test, it does not skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.app import create_app
from service.settings import Settings
from sglang_ext.stats import SpecStats
from tests.service.conftest import serve_in_thread
from tests.service.test_metrics import delta, scrape

FIXTURES_DIR = Path(
    os.environ.get("DFLARE_FIXTURES_DIR") or Path(__file__).parents[1] / "fixtures" / "sglang"
)
SPLITTER = Path(__file__).parents[1] / "fixtures" / "sglang" / "split_fixtures.py"
GREEDY = (
    "dflare_models",
    "dflash_noplugin_models",
    "dflare_generate",
    "dflare_generate_stream",
    "dflare_chat",
    "dflare_chat_stream",
    "dflare_completions",
    "dflare_completions_stream",
    "dflash_noplugin_chat_meta",
    "dflash_noplugin_generate",
    "dflash_noplugin_chat_stream",
)
SAMPLED = "dflare_chat_n2"
# fields the gateway sets on every upstream request itself (documented in service/backends/sglang_http.py);
# ``model`` too is not matched: a user names the model /v1/models lists, which one SGLang server does not
# route on (the capture named the model path)
GATEWAY_FIELDS = ("stream", "stream_options", "return_meta_info", "model")
CHAT = "/v1/chat/completions"


# ---- loading and reading the recordings ------------------------------------------------------
def load_recordings(folder: Path = FIXTURES_DIR) -> dict[str, dict[str, Any]]:
    return {p.stem: orjson.loads(p.read_bytes()) for p in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def recs() -> dict[str, dict[str, Any]]:
    found = load_recordings()
    assert found, f"no recorded SGLang fixtures in {FIXTURES_DIR} (see tests/fixtures/sglang/README.md)"
    missing = [n for n in (*GREEDY, SAMPLED) if n not in found]
    assert not missing, f"{FIXTURES_DIR} lacks {missing}"
    failed = {n: (found[n]["status"], found[n]["body"][:300]) for n in GREEDY if found[n]["status"] != 200}
    assert not failed, f"captures that did not succeed on the GPU: {failed}"
    return found


def events(sse: str | bytes) -> list[str]:
    """The ``data:`` payloads of an SSE text, in order (``[DONE]`` included)."""
    text = sse.decode() if isinstance(sse, bytes) else sse
    return [e.strip()[len("data: ") :] for e in text.split("\n\n") if e.strip().startswith("data: ")]


def chunks(sse: str | bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in events(sse) if e != "[DONE]"]


def usage_chunk(sse: str | bytes) -> dict[str, Any] | None:
    """The final usage chunk (``"choices": []`` with ``usage``), or ``None``."""
    found = [c for c in chunks(sse) if c.get("choices") == [] and isinstance(c.get("usage"), dict)]
    assert len(found) <= 1, f"{len(found)} usage chunks"
    return found[0] if found else None


def streamed_text(sse: str | bytes) -> dict[int, str]:
    """Concatenated content deltas (chat) or text pieces (completions), per choice index."""
    out: dict[int, str] = {}
    for c in chunks(sse):
        for choice in c.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            out[choice["index"]] = out.get(choice["index"], "") + (piece or "")
    return out


def answer_text(body: dict[str, Any]) -> dict[int, str]:
    return {
        c["index"]: (c["message"]["content"] or "") if "message" in c else c["text"] for c in body["choices"]
    }


def listed_model(recs: dict[str, dict[str, Any]], name: str) -> str:
    """The model id the server of capture ``name`` lists on /v1/models (what a user asks for)."""
    server = "dflash_noplugin" if name.startswith("dflash_noplugin") else "dflare"
    return orjson.loads(recs[f"{server}_models"]["body"])["data"][0]["id"]


def user_request(recs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """What a user of the gateway sends for capture ``name``: SGLang's ``return_meta_info`` is ours to add."""
    body = {k: v for k, v in recs[name]["request"].items() if k != "return_meta_info"}
    return {**body, "model": listed_model(recs, name)}


def recorded_usage(rec: dict[str, Any]) -> dict[str, Any]:
    """``usage`` of a non-streamed answer, or of the stream's usage chunk."""
    if rec["request"].get("stream"):
        chunk = usage_chunk(rec["body"])
        assert chunk is not None, "the stream has no usage chunk"
        return chunk["usage"]
    return orjson.loads(rec["body"])["usage"]


def final_meta(rec: dict[str, Any]) -> dict[str, Any]:
    """``meta_info`` of a native /generate answer (its last chunk when streamed) or of chat choice 0."""
    if rec["url"] == "generate":
        if rec["request"].get("stream"):
            return chunks(rec["body"])[-1]["meta_info"]
        return orjson.loads(rec["body"])["meta_info"]
    return orjson.loads(rec["body"])["choices"][0]["meta_info"]


# ---- the checks (each raises AssertionError or ValueError on a bad recording) --------------------
def as_read(spec: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``usage.speculative`` as the gateway re-sends it: recordings from a plugin without
    plain steps lack ``plain_decode_steps``, which then reads as 0."""
    return {"plain_decode_steps": 0, **spec}


def check_speculative(usage: dict[str, Any], choices: int = 1) -> SpecStats | None:
    """``usage.speculative`` from our plugin: parses, agrees with itself and with the token count.

    ``null`` is right only for a request that never reached a verify step (SGLang then reports no
    speculative fields at all): each choice ended on the token its prefill produced.
    """
    assert "speculative" in usage, f"usage.speculative missing: {usage}"
    spec = usage["speculative"]
    if spec is None:
        assert usage["completion_tokens"] <= choices, f"null stats for a request that decoded: {usage}"
        return None
    assert isinstance(spec, dict), f"usage.speculative is not an object: {spec!r}"
    stats = SpecStats.from_usage(spec)
    steps, accepted = spec["verify_steps"], spec["accepted_tokens"]
    assert sum(spec["histogram"]) == steps, "histogram does not sum to verify_steps"
    tau = 1 + accepted / steps if steps else 1.0
    assert spec["acceptance_length"] == pytest.approx(tau, abs=1e-4), f"acceptance_length is not {tau}"
    assert stats.to_usage() == as_read(spec), f"a derived field disagrees with the histogram: {spec}"
    check_token_bounds(usage["completion_tokens"], stats, choices)
    return stats


def check_token_bounds(completion_tokens: int, stats: SpecStats, choices: int = 1) -> None:
    """Each verify step commits its accepted drafts plus one token, the prefill one more per choice;
    a stop or ``max_tokens`` can only cut the last step."""
    most = choices + stats.verify_steps + stats.accepted_tokens
    assert stats.verify_steps <= completion_tokens <= most, (
        f"completion_tokens={completion_tokens} outside [{stats.verify_steps}, {most}] for {stats}"
    )


def check_meta_info(meta: dict[str, Any]) -> SpecStats:
    """SGLang's own ``meta_info`` speculative fields: parse, agree with each other and the tokens."""
    stats = SpecStats.from_sglang_meta_info(meta)
    assert stats is not None, f"no speculative fields in {sorted(meta)}"
    steps = meta["spec_verify_ct"]
    hist = meta["spec_correct_drafts_histogram"]
    assert sum(hist) == steps, f"histogram {hist} does not sum to spec_verify_ct={steps}"
    assert not any(hist[stats.block_size :]), f"histogram {hist} counts beyond block size {stats.block_size}"
    assert meta["spec_num_proposed_drafts"] == steps * (stats.block_size - 1), "spec_num_proposed_drafts"
    assert meta["spec_accept_rate"] == pytest.approx(stats.acceptance_rate), "spec_accept_rate"
    # SGLang's spec_accept_length counts the prefill token: completion tokens per verify step
    assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / steps), (
        "spec_accept_length"
    )
    for alias, name in (
        ("spec_accept_histogram", "spec_correct_drafts_histogram"),
        ("spec_accepted_drafts", "spec_num_correct_drafts"),
        ("spec_proposed_drafts", "spec_num_proposed_drafts"),
    ):
        if alias in meta:  # 0.5.17 aliases
            assert meta[alias] == meta[name], f"alias {alias} disagrees"
    check_token_bounds(meta["completion_tokens"], stats)
    return stats


# ---- the replay server and gateways in front of it -------------------------------------------
def replay_app(recordings: dict[str, dict[str, Any]], received: list[dict[str, Any]]) -> Starlette:
    """Answers each recorded request path with the recorded bytes (SSE event by event)."""

    def key(path: str, body: dict[str, Any]) -> tuple:
        """Compared with ``==``: JSON ``0`` and ``0.0`` are the same request (pydantic sends floats)."""
        return path, bool(body.get("stream")), {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}

    posts = [(key("/" + r["url"], r["request"]), r) for r in recordings.values() if r.get("method") != "GET"]
    gets = {"/" + r["url"]: r for r in recordings.values() if r.get("method") == "GET"}

    async def replay(request: Request) -> Response:
        path = request.url.path
        if request.method == "GET":
            if path == "/health":
                return Response(status_code=200)
            rec = gets.get(path)
        else:
            body = orjson.loads(await request.body())
            received.append({"path": path, **body})
            rec = next((r for k, r in posts if k == key(path, body)), None)
        if rec is None:
            what = f"no recording for {request.method} {path} {received[-1] if received else ''}"
            return JSONResponse({"object": "error", "message": what, "code": 404}, status_code=404)
        status = rec["status"] or 500
        if status == 200 and (rec.get("request") or {}).get("stream"):

            async def sse() -> Any:
                for event in rec["body"].split("\n\n"):
                    if event.strip():
                        yield event + "\n\n"
                        await asyncio.sleep(0)

            return StreamingResponse(sse(), status_code=status, media_type="text/event-stream")
        return Response(rec["body"], status_code=status, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", replay, methods=["GET", "POST"])])


class Upstream:
    """A replay server of some recordings, and a gateway (``dflare serve`` app) in front of it."""

    def __init__(self, replay_url: str, gateway_url: str, received: list[dict[str, Any]]) -> None:
        self.url = replay_url
        self.gateway = gateway_url
        self.received = received


@pytest.fixture(scope="module")
def serve_recordings() -> Iterator[Callable[[dict[str, dict[str, Any]]], Upstream]]:
    """Starts replay server + gateway pairs on free ports; all stopped when the module is done."""
    with contextlib.ExitStack() as stack:

        def start(recordings: dict[str, dict[str, Any]]) -> Upstream:
            received: list[dict[str, Any]] = []
            replay_url = stack.enter_context(serve_in_thread(replay_app(recordings, received)))
            settings = Settings(backends=[replay_url], health_interval_s=0.1)
            gateway_url = stack.enter_context(serve_in_thread(create_app(settings)))
            deadline = time.monotonic() + 30
            while httpx.get(gateway_url + "/ready").status_code != 200:
                assert time.monotonic() < deadline, "the gateway never saw the replay server ready"
                time.sleep(0.05)
            return Upstream(replay_url, gateway_url, received)

        yield start


def _only(recs: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in recs.items() if n.startswith(prefix + "_")}


@pytest.fixture(scope="module")
def dflare(recs, serve_recordings) -> Upstream:
    return serve_recordings(_only(recs, "dflare"))


@pytest.fixture(scope="module")
def noplugin(recs, serve_recordings) -> Upstream:
    return serve_recordings(_only(recs, "dflash_noplugin"))


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=30)


def spec_metrics(before: dict, after: dict, model: str, backend: str) -> dict[str, float]:
    labels = {"model": model, "backend": backend}
    return {
        name: delta(before, after, f"dflare_spec_decode_{name}_total", **labels)
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    }


def wait_for_metrics(url: str, before: dict, model: str, backend: str, want: dict[str, float]) -> None:
    """Metrics are recorded once the response has gone out: poll briefly for the expected deltas."""
    deadline = time.monotonic() + 5
    while (got := spec_metrics(before, scrape(url), model, backend)) != want:
        assert time.monotonic() < deadline, f"metrics moved by {got}, expected {want}"
        time.sleep(0.05)


# ---- comparisons of what the gateway gave a user with what SGLang sent ----------------------------
def assert_answer_relayed(resp: httpx.Response, rec: dict[str, Any], expected: SpecStats | None) -> None:
    assert resp.status_code == 200, resp.text
    got, sent = resp.json(), orjson.loads(rec["body"])
    assert answer_text(got) == answer_text(sent)
    assert all("meta_info" not in c for c in got["choices"]), "meta_info must be stripped"
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert got["usage"][k] == sent["usage"][k], k
    assert got["usage"]["speculative"] == (expected.to_usage() if expected else None)
    if expected is not None:
        assert resp.headers["x-dflare-verify-steps"] == str(expected.verify_steps)
        assert resp.headers["x-dflare-accepted-tokens"] == str(expected.accepted_tokens)
        assert float(resp.headers["x-dflare-acceptance-length"]) == pytest.approx(
            expected.acceptance_length, abs=1e-4
        )


def assert_stream_relayed(raw: bytes, rec: dict[str, Any], speculative: dict[str, Any] | None) -> None:
    """Every recorded event relayed in order, the usage chunk with ``speculative`` as given."""
    got, sent = events(raw), events(rec["body"])
    assert got[-1] == "[DONE]" and len(got) == len(sent)
    assert streamed_text(raw) == streamed_text(rec["body"])
    sent_usage = usage_chunk(rec["body"])
    assert sent_usage is not None
    for g, s in zip(got, sent, strict=True):
        if s != "[DONE]" and orjson.loads(s).get("choices") == []:
            assert orjson.loads(g) == {
                **sent_usage,
                "usage": {**sent_usage["usage"], "speculative": speculative},
            }
        else:
            assert g == s, "a content event was changed in transit"


# ---- (d) the recordings themselves ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["dflare_chat", "dflare_chat_stream", "dflare_completions", "dflare_completions_stream"]
)
def test_plugin_usage_speculative_is_self_consistent(recs, name):
    stats = check_speculative(recorded_usage(recs[name]))
    block = check_meta_info(final_meta(recs["dflare_generate"])).block_size
    if stats is not None:
        assert stats.block_size == block, "our hooks and SGLang's meta_info disagree on the block size"


def test_sampled_n2_usage_sums_both_choices(recs):
    rec = recs[SAMPLED]
    if rec["status"] != 200:  # refused upstream: must be SGLang's error object, not a crash
        assert rec["status"] == 400 and orjson.loads(rec["body"])["object"] == "error", rec["body"][:300]
        return
    body = orjson.loads(rec["body"])
    assert len(body["choices"]) == 2
    stats = check_speculative(body["usage"], choices=2)
    assert stats is not None and stats.verify_steps > 0


@pytest.mark.parametrize(
    "name",
    ["dflare_generate", "dflare_generate_stream", "dflash_noplugin_generate", "dflash_noplugin_chat_meta"],
)
def test_sglang_meta_info_parses_and_agrees_with_tokens(recs, name):
    rec = recs[name]
    meta = final_meta(rec)
    stats = check_meta_info(meta)
    assert stats.verify_steps > 0, "greedy decoding of 48 tokens must have verified drafts"
    if rec["url"] == "generate":
        final = chunks(rec["body"])[-1] if rec["request"].get("stream") else orjson.loads(rec["body"])
        assert len(final["output_ids"]) == meta["completion_tokens"]
    if rec["request"].get("stream"):  # SGLang adds the spec fields only once the request finished
        assert all("spec_verify_ct" not in c["meta_info"] for c in chunks(rec["body"])[:-1])


def test_recordings_are_sglang_not_our_imitation(recs):
    """Fields only real SGLang 0.5.17 sends (our engine-server does not imitate them): a guard
    against committing an engine-server capture as a fixture."""
    assert "weight_version" in final_meta(recs["dflare_generate"])
    assert orjson.loads(recs["dflare_chat"]["body"])["metadata"] == {"weight_version": "default"}


def test_without_the_plugin_sglang_sends_no_usage_speculative(recs):
    """What makes the gateway's meta_info path necessary: stock SGLang's usage has no stats."""
    assert "speculative" not in orjson.loads(recs["dflash_noplugin_chat_meta"]["body"])["usage"]
    assert "speculative" not in recorded_usage(recs["dflash_noplugin_chat_stream"])


def test_splitter_round_trip(recs, tmp_path):
    """What the GPU check writes, split by the committed script, gives back these recordings."""
    joined = tmp_path / "fixtures.json"
    joined.write_bytes(orjson.dumps(recs))
    out = tmp_path / "split"
    run = [sys.executable, str(SPLITTER), str(joined), "--out", str(out)]
    subprocess.run(run, check=True, capture_output=True)
    assert load_recordings(out) == recs
    joined.write_bytes(orjson.dumps({**recs, "late_capture": {"url": "generate", "status": 200}}))
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 1 and "lacks ['body']" in refused.stderr
    assert not (out / "late_capture.json").exists()


# ---- (a) non-streamed answers through the gateway ----------------------------------------------
@pytest.mark.parametrize("name", ["dflare_chat", "dflare_completions"])
def test_gateway_relays_plugin_stats(dflare, recs, name):
    rec = recs[name]
    path = "/" + rec["url"]
    model = listed_model(recs, name)
    spec = recorded_usage(rec)["speculative"]
    expected = SpecStats.from_usage(spec) if spec is not None else None
    before = scrape(dflare.gateway)
    resp = post(dflare.gateway + path, user_request(recs, name))
    assert_answer_relayed(resp, rec, expected)
    assert resp.json()["usage"]["speculative"] == as_read(spec)
    assert resp.headers["x-dflare-backend"] == dflare.url
    forwarded = dflare.received[-1]
    assert forwarded["model"] == model and forwarded["stream"] is False
    assert forwarded.get("return_meta_info") is (True if path == CHAT else None)
    want = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    if expected is not None:
        want = {
            "num_drafts": expected.verify_steps,
            "num_draft_tokens": expected.draft_tokens,
            "num_accepted_tokens": expected.accepted_tokens,
        }
    else:  # nothing speculated: no x-dflare-* stats headers either
        assert not any(h.startswith("x-dflare-verify") for h in resp.headers)
    wait_for_metrics(dflare.gateway, before, model, dflare.url, want)


# ---- (b) streams through the gateway ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["dflare_chat_stream", "dflare_completions_stream"])
def test_gateway_relays_plugin_stream(dflare, recs, name):
    rec = recs[name]
    path = "/" + rec["url"]
    spec = recorded_usage(rec)["speculative"]
    check_speculative(recorded_usage(rec))
    resp = post(dflare.gateway + path, user_request(recs, name))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert_stream_relayed(resp.content, rec, spec)
    assert events(resp.content) == events(rec["body"]), "SGLang's stream must be relayed as it is"
    # a client that did not ask for usage gets the same content and no usage chunk
    plain = {k: v for k, v in user_request(recs, name).items() if k != "stream_options"}
    quiet = post(dflare.gateway + path, plain).content
    assert usage_chunk(quiet) is None and events(quiet)[-1] == "[DONE]"
    assert streamed_text(quiet) == streamed_text(rec["body"])
    assert dflare.received[-1]["stream_options"] == {"include_usage": True}


def test_gateway_relays_sampled_n2(dflare, recs):
    """SGLang's two sampled choices reach the user as sent; usage (summed by SGLang and our plugin)
    drives the headers and the metrics, for both choices."""
    rec = recs[SAMPLED]
    assert rec["status"] == 200, rec["body"][:300]
    usage = recorded_usage(rec)
    expected = check_speculative(usage, choices=2)
    assert expected is not None
    model = listed_model(recs, SAMPLED)
    before = scrape(dflare.gateway)
    resp = post(dflare.gateway + CHAT, user_request(recs, SAMPLED))
    assert_answer_relayed(resp, rec, expected)
    got = resp.json()
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in got["choices"]] == [
        c["finish_reason"] for c in orjson.loads(rec["body"])["choices"]
    ]
    assert dflare.received[-1]["n"] == 2
    want = {
        "num_drafts": expected.verify_steps,
        "num_draft_tokens": expected.draft_tokens,
        "num_accepted_tokens": expected.accepted_tokens,
    }
    wait_for_metrics(dflare.gateway, before, model, dflare.url, want)
    labels = {"model": model, "backend": dflare.url}
    after = scrape(dflare.gateway)
    assert delta(before, after, "dflare_completion_tokens_total", **labels) == usage["completion_tokens"]
    assert delta(before, after, "dflare_prompt_tokens_total", **labels) == usage["prompt_tokens"]


# ---- (c) SGLang's built-in DFLASH without our plugin --------------------------------------------
def test_gateway_turns_meta_info_into_usage_speculative(noplugin, recs):
    name = "dflash_noplugin_chat_meta"
    rec = recs[name]
    expected = SpecStats.from_sglang_meta_info(final_meta(rec))
    assert expected is not None
    resp = post(noplugin.gateway + CHAT, user_request(recs, name))
    assert_answer_relayed(resp, rec, expected)
    assert noplugin.received[-1]["return_meta_info"] is True
    # and in SGLang's own numbers, not only through SpecStats
    meta, spec = final_meta(rec), resp.json()["usage"]["speculative"]
    assert spec["verify_steps"] == meta["spec_verify_ct"]
    assert spec["accepted_tokens"] == meta["spec_num_correct_drafts"]
    assert spec["draft_tokens"] == meta["spec_num_proposed_drafts"]
    hist = meta["spec_correct_drafts_histogram"]  # SGLang drops trailing empty bins
    assert spec["histogram"] == hist + [0] * (spec["block_size"] - len(hist))
    tau = 1 + meta["spec_num_correct_drafts"] / meta["spec_verify_ct"]
    assert spec["acceptance_length"] == pytest.approx(tau, abs=1e-4)


def test_gateway_reports_null_stats_for_a_stock_stream(noplugin, recs):
    """Stock SGLang streams carry no stats: the gateway says ``null``, it never invents them."""
    name = "dflash_noplugin_chat_stream"
    rec = recs[name]
    resp = post(noplugin.gateway + CHAT, user_request(recs, name))
    assert resp.status_code == 200
    assert_stream_relayed(resp.content, rec, None)


# ---- the checks can fail -------------------------------------------------------------------------
def _first_movable_bin(hist: list[int]) -> int:
    return next(k for k, n in enumerate(hist[:-1]) if n)


def _shift_one_step(spec: dict[str, Any]) -> dict[str, Any]:
    """A consistent but different ``usage.speculative``: one step accepted one more draft."""
    hist = list(spec["histogram"])
    k = _first_movable_bin(hist)
    hist[k] -= 1
    hist[k + 1] += 1
    return SpecStats(spec["block_size"], hist).to_usage()


def _mutate_usage(recs, fn: Callable[[dict[str, Any]], None]) -> None:
    body = orjson.loads(recs["dflare_chat"]["body"])
    fn(body["usage"])
    check_speculative(body["usage"])


def _mutate_meta(recs, fn: Callable[[dict[str, Any]], None]) -> None:
    meta = copy.deepcopy(final_meta(recs["dflare_generate"]))
    fn(meta)
    check_meta_info(meta)


def _bump(mapping: Any, key: str | int, by: float) -> None:
    mapping[key] += by


def _gain_a_step(usage: dict[str, Any]) -> None:
    usage["speculative"]["histogram"][0] += 1


def _too_many_tokens(usage: dict[str, Any]) -> None:
    spec = usage["speculative"]
    usage["completion_tokens"] = 2 + spec["verify_steps"] + spec["accepted_tokens"]


def _beyond_block(meta: dict[str, Any]) -> None:
    """One step moved past the last bin, the totals kept: only the bin range is wrong."""
    for key in ("spec_correct_drafts_histogram", "spec_accept_histogram"):
        hist = meta[key]
        hist[next(k for k, n in enumerate(hist) if n)] -= 1
        hist.append(1)


def _fewer_tokens_than_steps(meta: dict[str, Any]) -> None:
    meta["completion_tokens"] = meta["spec_verify_ct"] - 1
    meta["spec_accept_length"] = meta["completion_tokens"] / meta["spec_verify_ct"]


# mutation -> (what it does to a recording, the message of the check that must catch it)
MUTATIONS: dict[str, tuple[Callable[[dict[str, dict[str, Any]]], None], str]] = {
    "histogram gains a step": (lambda r: _mutate_usage(r, _gain_a_step), "verify_steps disagrees"),
    "acceptance_length off": (
        lambda r: _mutate_usage(r, lambda u: _bump(u["speculative"], "acceptance_length", 0.01)),
        "acceptance_length is not",
    ),
    "accepted_tokens off": (
        lambda r: _mutate_usage(r, lambda u: _bump(u["speculative"], "accepted_tokens", 1)),
        "acceptance_length is not",
    ),
    "per-position count off": (
        lambda r: _mutate_usage(r, lambda u: _bump(u["speculative"]["accepted_per_position"], 0, 1)),
        "derived field disagrees",
    ),
    "too many completion tokens": (lambda r: _mutate_usage(r, _too_many_tokens), "outside"),
    "usage.speculative dropped": (
        lambda r: _mutate_usage(r, lambda u: u.pop("speculative")),
        "usage.speculative missing",
    ),
    "meta correct drafts off": (
        lambda r: _mutate_meta(r, lambda m: _bump(m, "spec_num_correct_drafts", 1)),
        "disagrees with its histogram",
    ),
    "meta histogram beyond block": (
        lambda r: _mutate_meta(r, _beyond_block),
        "beyond block size|disagrees with its histogram",  # the parser truncates, then sees the sum
    ),
    "meta accept length off": (
        lambda r: _mutate_meta(r, lambda m: _bump(m, "spec_accept_length", 0.5)),
        "spec_accept_length",
    ),
    "meta fewer tokens than steps": (lambda r: _mutate_meta(r, _fewer_tokens_than_steps), "outside"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_recording_checks_catch_a_mutation(recs, mutation):
    check_speculative(recorded_usage(recs["dflare_chat"]))  # unmutated: both pass
    check_meta_info(final_meta(recs["dflare_generate"]))
    mutate, message = MUTATIONS[mutation]
    with pytest.raises((AssertionError, ValueError), match=message):
        mutate(recs)


def test_gateway_comparisons_catch_a_changed_upstream(recs, serve_recordings):
    """Replay altered bytes: the comparisons against the original recording must notice."""
    altered = copy.deepcopy(_only(recs, "dflare"))
    chat = orjson.loads(altered["dflare_chat"]["body"])
    chat["usage"]["speculative"] = _shift_one_step(chat["usage"]["speculative"])
    altered["dflare_chat"]["body"] = orjson.dumps(chat).decode()
    stream = altered["dflare_chat_stream"]
    sent = events(stream["body"])
    drop = next(i for i, e in enumerate(sent) if (streamed_text("data: " + e + "\n\n").get(0) or "").strip())
    stream["body"] = "".join(f"data: {e}\n\n" for i, e in enumerate(sent) if i != drop)
    upstream = serve_recordings(altered)

    original = recs["dflare_chat"]
    resp = post(upstream.gateway + CHAT, user_request(recs, "dflare_chat"))
    assert resp.status_code == 200
    with pytest.raises(AssertionError):
        assert_answer_relayed(resp, original, SpecStats.from_usage(recorded_usage(original)["speculative"]))
    raw = post(upstream.gateway + CHAT, user_request(recs, "dflare_chat_stream")).content
    with pytest.raises(AssertionError):
        assert_stream_relayed(
            raw, recs["dflare_chat_stream"], recorded_usage(recs["dflare_chat_stream"])["speculative"]
        )
