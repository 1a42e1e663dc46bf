"""What the HTTP layer costs: time to first token and tokens/s through `duospec serve` against
`duospec generate` on the same prompts, the same method and the same models, in one run.

    python scripts/server_overhead.py --method sd --max-tokens 64 --out docs/bench/server
    python scripts/server_overhead.py --method ar -- --target my-model --draft my-draft   # model flags after --

It runs `duospec generate --json --prompts-file` (one process, every prompt), then starts `duospec serve`
and sends each prompt once as a streaming chat request, one at a time (never both at once: the two would
share the CPU). Measured at the client: time to first token (request sent -> first text), tokens/s
(completion tokens / request time). `duospec generate` reports its own figures (from the start of the
request, models already loaded). The server's own figures for the same request (its `duospec` field)
split the difference into queueing plus HTTP on one side and generation on the other. Greedy: the token
ids must match, or the comparison is void. Writes overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from duospec.bench.data import available_tasks, load_questions, packaged_questions_path, select_questions  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sd")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-task", type=int, default=1, help="Spec-Bench questions per task (first turn only)")
    parser.add_argument("--rounds", type=int, default=1, help="run both sides this many times, alternating A B B A ... (machine drift cancels); medians per prompt")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "server")
    parser.add_argument("model_flags", nargs="*", help="flags for both commands after --, e.g. -- --target X --draft Y")
    args = parser.parse_args()
    questions = load_questions(packaged_questions_path())
    prompts = [q.turns[0] for q in select_questions(questions, available_tasks(questions), args.per_task)]

    directs, serveds = [], []
    for round_number in range(args.rounds):
        sides = [(directs, run_generate), (serveds, run_server)]
        for results, run in sides if round_number % 2 == 0 else sides[::-1]:
            results.append(run(prompts, args))
    rows = [median_row([compare(prompt, d[i], s[i]) for d, s in zip(directs, serveds)]) for i, prompt in enumerate(prompts)]
    summary = summarise(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    (args.out / "overhead.md").write_text(markdown(summary, rows))
    print(markdown(summary, rows))
    return 0


def run_generate(prompts: list[str], args) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        for prompt in prompts:
            file.write(json.dumps({"prompt": prompt}) + "\n")
    command = [sys.executable, "-m", "duospec", "generate", "--prompts-file", file.name, "--json", "--method", args.method,
               "--max-new-tokens", str(args.max_tokens), *args.model_flags]
    print("$", " ".join(command), file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    os.unlink(file.name)
    if done.returncode != 0:
        raise SystemExit(f"duospec generate failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def run_server(prompts: list[str], args) -> list[dict]:
    command = [sys.executable, "-m", "duospec", "serve", "--port", "0", "--method", args.method, *args.model_flags]
    print("$", " ".join(command), file=sys.stderr)
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = None
        for line in server.stderr:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise SystemExit("the server exited before listening")
        return [stream_one(port, prompt, args) for prompt in prompts]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def stream_one(port: int, prompt: str, args) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    token_ids: list[int] = []
    stats = usage = None
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content") and first is None:
                first = time.perf_counter() - sent
            if choice.get("finish_reason"):
                stats = event["duospec"]
        if not event.get("choices") or stats is not None:
            continue
        token_ids += (event.get("duospec") or {}).get("token_ids", [])
    total = time.perf_counter() - sent
    connection.close()
    return {"ttft": first, "seconds": total, "tokens": usage["completion_tokens"], "server": stats, "token_ids": stats.get("token_ids", token_ids)}


def compare(prompt: str, direct: dict, served: dict) -> dict:
    return {
        "prompt": prompt[:60],
        "same_tokens": direct["token_ids"] == served["token_ids"],
        "tokens": served["tokens"],
        "generate_ttft": direct["ttft_seconds"],
        "server_ttft_client": served["ttft"],
        "server_ttft_inside": served["server"]["ttft_seconds"],
        "generate_tok_s": direct["tokens_per_second"],
        "server_tok_s_client": served["tokens"] / served["seconds"],
        "server_tok_s_inside": served["server"]["tokens_per_second"],
    }


def median_row(rows: list[dict]) -> dict:
    """One prompt's figures over the rounds: medians of the numbers, tokens the same in every round."""
    merged = {key: statistics.median(row[key] for row in rows) for key in rows[0] if isinstance(rows[0][key], float)}
    return {**rows[0], **merged, "same_tokens": all(row["same_tokens"] for row in rows), "rounds": len(rows)}


def summarise(rows: list[dict], args) -> dict:
    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "method": args.method,
        "max_tokens": args.max_tokens,
        "prompts": len(rows),
        "all_same_tokens": all(row["same_tokens"] for row in rows),
        "median_generate_ttft": median("generate_ttft"),
        "median_server_ttft_client": median("server_ttft_client"),
        "rounds": args.rounds,
        "median_server_tok_s_inside": median("server_tok_s_inside"),
        "median_http_tok_s_ratio": statistics.median(r["server_tok_s_client"] / r["server_tok_s_inside"] for r in rows),
        "median_ttft_overhead_ms": 1000 * statistics.median(r["server_ttft_client"] - r["server_ttft_inside"] for r in rows),
        "median_generate_tok_s": median("generate_tok_s"),
        "median_server_tok_s_client": median("server_tok_s_client"),
        "median_tok_s_ratio": statistics.median(r["server_tok_s_client"] / r["generate_tok_s"] for r in rows),
        "machine": machine(),
    }


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def markdown(summary: dict, rows: list[dict]) -> str:
    lines = [
        f"# HTTP overhead of `duospec serve` ({summary['method']}, {summary['max_tokens']} tokens, {summary['prompts']} prompts, "
        f"{summary['rounds']} alternating rounds, medians per prompt; {summary['machine']})",
        "",
        "| prompt | same tokens | tokens | TTFT generate | TTFT server (client) | TTFT server (inside) | tok/s generate | tok/s server (client) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt'].replace('|', ' ').replace(chr(10), ' ')[:40]} | {'yes' if r['same_tokens'] else 'NO'} | {r['tokens']} | {r['generate_ttft']:.3f} | "
            f"{r['server_ttft_client']:.3f} | {r['server_ttft_inside']:.3f} | {r['generate_tok_s']:.2f} | {r['server_tok_s_client']:.2f} |"
        )
    lines += [
        "",
        f"Medians: TTFT {summary['median_generate_ttft']:.3f} s (generate) vs {summary['median_server_ttft_client']:.3f} s (server, at the client); "
        f"the HTTP layer adds {summary['median_ttft_overhead_ms']:.1f} ms to the first token (client TTFT minus the server's own). "
        f"Tokens/s {summary['median_generate_tok_s']:.2f} (generate) vs {summary['median_server_tok_s_client']:.2f} (server, at the client; ratio {summary['median_tok_s_ratio']:.3f}); "
        f"at the client vs the server's own count: ratio {summary['median_http_tok_s_ratio']:.4f}. "
        f"Same tokens on every prompt: {summary['all_same_tokens']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
