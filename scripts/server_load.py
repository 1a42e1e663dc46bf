"""A bounded load test of `duospec serve`: C clients x R requests each, loopback only, stops by itself.

    python scripts/server_load.py --clients 16 --requests 4 --max-tokens 16 --out docs/bench/server/load
    python scripts/server_load.py -- --target my-model --draft my-draft     # model flags after --

Starts the server (`--port 0`), answers each prompt once alone (the reference, greedy), then lets
every client send its requests back to back, half streamed, half not. Each request must end one of
two ways: 200 with exactly the reference text, or 503 with Retry-After. Reports the counts, latency
medians, the server's resident memory before and after (from /metrics), and writes load.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a haiku about caches.", "What is 17 * 23?", "Name three sorting algorithms.", "Say hello in French."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--method", default="sd")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "server" / "load")
    parser.add_argument("model_flags", nargs="*")
    args = parser.parse_args()
    command = [sys.executable, "-m", "duospec", "serve", "--port", "0", "--method", args.method, "--max-queue", str(args.max_queue), *args.model_flags]
    print("$", " ".join(command), file=sys.stderr)
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = next(int(m.group(1)) for line in server.stderr if (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)))
        reference = {p: ask(port, p, args.max_tokens, stream=False)[1] for p in PROMPTS}
        rss_before = resident_mb(port)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = [o for batch in pool.map(lambda c: one_client(port, c, args, reference), range(args.clients)) for o in batch]
        wall = time.perf_counter() - started
        time.sleep(1.0)
        rss_after = resident_mb(port)
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    answered = [o for o in outcomes if o["status"] == 200]
    refused = [o for o in outcomes if o["status"] == 503]
    summary = {
        "clients": args.clients, "requests_each": args.requests, "max_tokens": args.max_tokens, "max_queue": args.max_queue, "method": args.method,
        "sent": len(outcomes), "answered": len(answered), "answered_correctly": sum(o["correct"] for o in answered),
        "refused_503": len(refused), "refused_with_retry_after": sum(bool(o["retry_after"]) for o in refused),
        "other": len(outcomes) - len(answered) - len(refused),
        "median_answered_seconds": statistics.median(o["seconds"] for o in answered) if answered else None,
        "median_refusal_ms": 1000 * statistics.median(o["seconds"] for o in refused) if refused else None,
        "wall_seconds": wall, "rss_mb_before": rss_before, "rss_mb_after": rss_after, "server_exit_code": exit_code,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"summary": summary, "outcomes": outcomes}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["other"] == 0 and summary["answered_correctly"] == len(answered) else 1


def one_client(port: int, number: int, args, reference: dict) -> list[dict]:
    outcomes = []
    for turn in range(args.requests):
        prompt = PROMPTS[(number + turn) % len(PROMPTS)]
        started = time.perf_counter()
        status, text, retry_after = ask(port, prompt, args.max_tokens, stream=bool((number + turn) % 2))
        outcomes.append({"client": number, "status": status, "correct": status == 200 and text == reference[prompt],
                         "retry_after": retry_after, "seconds": time.perf_counter() - started})
    return outcomes


def ask(port: int, prompt: str, max_tokens: int, stream: bool) -> tuple[int, str, str | None]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read().decode()
        if response.status != 200:
            return response.status, raw, response.getheader("Retry-After")
        if not stream:
            return 200, json.loads(raw)["choices"][0]["message"]["content"], None
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        return 200, "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")), None
    finally:
        connection.close()


def resident_mb(port: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE).group(1)) / 2**20


if __name__ == "__main__":
    sys.exit(main())
