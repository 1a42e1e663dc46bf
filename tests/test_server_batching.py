"""`duospec serve --max-batch 4` on tiny GGUF models: continuous batching as clients meet it.

A real server process on loopback, driven by the official `openai` client and raw HTTP: concurrent
streamed requests of every method give exactly the answers the same requests get alone, while they
join and leave mid-generation; a client leaving mid-stream, or a bad request among good ones, leaves
the others' answers untouched; memory after 1,000 requests is what it was after 10; SIGTERM with a
batch in flight cuts every stream cleanly and exits 0. The sampled law under batching is checked at
the library level (tests/test_batching.py).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the server tests drive it with the openai client: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="duospec serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("llama_cpp", reason="batching runs on the llama.cpp backend: pip install -e '.[llamacpp]'")

from server_process import ServerProcess  # noqa: E402
from test_server import completion_connection, metric, request, stream_or_whole, wait_for_health  # noqa: E402
from tiny_gguf import write_gguf  # noqa: E402
from tiny_models import perturbed, tiny_model  # noqa: E402

CONTEXT = 2048
BATCH = 4
PROMPTS = ["abc", "w1 w2 w3", "hello there", "w5 w9 w5 w9 w5", "xyz xyz", "q0 abc", "w20 w21 w22", "the cat"]
METHODS = ["auto", "ar", "sd", "pld", "suffix", "specexec"]


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-models")
    target = tiny_model(seed=0, max_positions=CONTEXT)
    return write_gguf(target, root / "target.gguf"), write_gguf(perturbed(target, noise=0.2, seed=7), root / "draft.gguf")


def batch_server(gguf_pair, cache, *extra: str) -> ServerProcess:
    target, draft = gguf_pair
    return ServerProcess(["--target", str(target), "--draft", str(draft), "--max-batch", str(BATCH), "--ctx-size", str(CONTEXT), "--served-model-name", "tiny", *extra], cache=cache)


@pytest.fixture(scope="module")
def server(gguf_pair, tmp_path_factory):
    process = batch_server(gguf_pair, tmp_path_factory.mktemp("batch-cache"), "--max-queue", "16")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def body(prompt: str, method: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": prompt, "method": method, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def alone(server, jobs) -> dict:
    """Each job answered with nothing else running (the reference)."""
    answers = {}
    for job in jobs:
        status, text, _ = stream_or_whole(server, body(*job))
        assert status == 200, text
        answers[job] = text
    return answers


def wait_idle(server, seconds: float = 30) -> None:
    wait_for_health(server, "running", 0, seconds)
    wait_for_health(server, "waiting", 0, seconds)


def test_health_and_start_up_line_report_the_batch(server):
    status, health, _ = request(server, "GET", "/health")
    assert status == 200 and health["max_batch"] == BATCH and health["running"] == 0
    assert re.search(rf"\(default method auto, batch {BATCH}, queue 16\)", server.log)
    assert metric(server, "duospec_max_batch") == BATCH
    one, eight = metric(server, "duospec_target_pass_seconds", '{tokens="1"}'), metric(server, "duospec_target_pass_seconds", '{tokens="8"}')
    assert 0 < one and 0 < eight  # the measured curve behind the budgets and the batch, seen from outside


def test_concurrent_streams_equal_the_same_requests_alone(server, client):
    """48 requests (8 prompts x 6 methods, 5 to 60 tokens each) streamed by 8 clients at once, each
    starting a little after the last: requests join and leave the batch mid-generation."""
    jobs = [(prompt, method, 5 + (11 * index) % 56) for index, (prompt, method) in enumerate((p, m) for p in PROMPTS for m in METHODS)]
    reference = alone(server, jobs)
    passes_before = metric(server, "duospec_batch_size_count")
    single_before = metric(server, "duospec_batch_size_bucket", '{le="1.0"}')

    def streamed(index_job) -> str:
        index, (prompt, method, max_tokens) = index_job
        time.sleep(0.01 * (index % 8))
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"method": method})
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(jobs, pool.map(streamed, enumerate(jobs))))
    mismatches = [job for job in jobs if answers[job] != reference[job]]
    assert not mismatches, mismatches
    passes = metric(server, "duospec_batch_size_count") - passes_before
    single = metric(server, "duospec_batch_size_bucket", '{le="1.0"}') - single_before
    assert passes > single, "no target pass served more than one request"
    assert metric(server, "duospec_request_passes_total", '{speculation="on"}') > 0


def test_a_client_leaving_mid_stream_while_others_go_on(server):
    wait_idle(server)
    stayers = [("abc", "ar", 300), ("w1 w2 w3", "suffix", 300)]
    reference = alone(server, stayers)
    leaving, response = completion_connection(server, body("hello there", "sd", 1500, stream=True))
    assert response.status == 200
    response.readline()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream_or_whole, server, body(*job, stream=True)) for job in stayers]
        wait_for_health(server, "running", 3)
        leaving.sock.shutdown(2)
        leaving.close()
        results = [future.result() for future in futures]
    assert [text for _, text, _ in results] == [reference[job] for job in stayers]
    line = server.wait_for_log(r"cmpl-\w+ /v1/completions 499 method=sd prompt=11 completion=(\d+) finish=cancelled")
    assert int(line.group(1)) < 1500
    wait_idle(server)


def test_a_bad_request_among_good_ones(server):
    wait_idle(server)
    good = [(prompt, "auto", 30) for prompt in PROMPTS[:5]]
    reference = alone(server, good)
    bad = [
        ({"model": "tiny", "prompt": "abc", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "abc", "max_tokens": 8, "method": "duo"}, 400, "--max-batch 1"),
        ({"model": "tiny", "prompt": "w" * (CONTEXT + 10), "max_tokens": 8}, 400, "context"),
    ]
    with ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(stream_or_whole, server, body(*job, stream=index % 2 == 0)) for index, job in enumerate(good)]
        bad_futures = [pool.submit(request, server, "POST", "/v1/completions", payload) for payload, _, _ in bad]
        assert [future.result()[1] for future in good_futures] == [reference[job] for job in good]
        for future, (_, status, words) in zip(bad_futures, bad):
            got, answer, _ = future.result()
            assert got == status and words in answer["error"]["message"], answer
    assert "Traceback" not in server.log


def test_memory_after_1000_requests_equals_memory_after_10(server):
    wait_idle(server)

    def one(index: int) -> int:
        return request(server, "POST", "/v1/completions", body(PROMPTS[index % len(PROMPTS)], METHODS[index % len(METHODS)], 2))[0]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(10))) == {200}
        wait_idle(server)
        after_10 = metric(server, "process_resident_memory_bytes")
        assert set(pool.map(one, range(1000))) == {200}
    wait_idle(server)
    after_1000 = metric(server, "process_resident_memory_bytes")
    assert after_1000 < after_10 + 32 * 2**20, f"memory grew by {(after_1000 - after_10) / 2**20:.0f} MB from 10 to 1,000 requests"


def test_sigterm_with_a_batch_in_flight_cuts_every_stream_and_exits_0(gguf_pair, tmp_path):
    server = batch_server(gguf_pair, tmp_path)
    try:
        streams = []
        for prompt in PROMPTS[:3]:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            connection.request("POST", "/v1/completions", body=json.dumps(body(prompt, "ar", 1500, stream=True)), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            streams.append((response, response.readline()))
        wait_for_health(server, "running", 3)
        server.process.send_signal(signal.SIGTERM)
        for response, first in streams:
            events = [line[6:] for line in (first + response.read()).decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert last["error"]["code"] == "server_shutting_down"
            assert last["error"]["partial_text"] == "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
        assert server.process.wait(30) == 0, server.log
    finally:
        server.stop()
