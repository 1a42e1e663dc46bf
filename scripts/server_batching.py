"""Continuous batching under load: `duospec serve` (default --max-batch), the same with --max-batch 1,
and llama-cpp-python's own server (`python -m llama_cpp.server`, same GGUF, same threads), in one run;
the same pair on the transformers backend (duospec-hf, duospec-hf-batch1).

    python scripts/server_batching.py --out docs/bench/server/batching
    python scripts/server_batching.py --clients 1,2,4 --max-tokens 16 --servers duospec,duospec-batch1
    python scripts/server_batching.py --clients 1,4 --servers duospec-batch1,duospec,duospec-duo --out /tmp/duo
    python scripts/server_batching.py --clients 1,2,4,8 --max-tokens 16 --servers duospec-hf-batch1,duospec-hf --out docs/bench/server/batching-hf

All servers start first (on loopback; an idle one costs no CPU). For each client count C, in turn on
every server before the next count (so a machine whose speed drifts shifts all alike), C clients each
send their requests back to back (chat, greedy, --max-tokens), all starting together; every request has a prompt of its
own (the same ones for every server), so no server answers from a cache of an earlier answer, and
duospec drafts from each request's own text only (--suffix-scope request). The report gives the total
generated tokens per second over the wall time, p50/p95 seconds per request, and how each request
ended (200, 503, other). The batching server's answers are compared with the same prompts answered
one at a time (the --max-batch 1 server's); a difference is re-scored on the target
(duospec/bench/ties.py) and classified as a near-tie or not. Then, on the batching server, a 4-token request's latency: quiet
(just before each check), beside a long prompt's prefill (--long-prompt-items; about 3,800 tokens by default), beside a first specexec request, beside 100 slow clients. Writes
results.json, report.md and throughput.png to --out. Needs the `server` extra of llama-cpp-python for
its row (sse-starlette, starlette-context, pydantic-settings); without it that row is skipped, saying so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each batching server and the server answering one request at a time that its answers are compared with.
BATCHING = {"duospec": "duospec-batch1", "duospec-hf": "duospec-hf-batch1"}
SERVER_FLAGS = {
    "duospec-batch1": ["--max-batch", "1"],
    "duospec-duo": ["--method", "duo"],  # duo serves one request at a time (it does not batch: docs/server.md)
    "duospec-hf": ["--backend", "transformers"],
    "duospec-hf-batch1": ["--backend", "transformers", "--max-batch", "1"],
}
# Prompts whose answers run longer than --max-tokens, so every request generates the same number of tokens.
TOPICS = ["caches", "compilers", "rivers", "trains", "chess", "bread", "satellites", "gardens", "libraries", "volcanoes", "bicycles", "owls", "bridges", "tea", "robots", "oceans"]
READERS = ["a child", "a student", "an engineer", "a poet", "a historian", "a chef", "a pilot", "a doctor"]


def prompt_for(clients: int, client: int, turn: int) -> str:
    """The prompt of one request of the run, the same for every server, different for every request."""
    index = 7 * clients + 3 * client + turn
    return f"Write a detailed essay of about 300 words about {TOPICS[index % len(TOPICS)]} for {READERS[(index // len(TOPICS) + client) % len(READERS)]} (request {clients}-{client}-{turn})."


PROMPTS = [prompt_for(0, 0, turn) for turn in range(2)]  # the latency checks' disturbances


def long_prompt(items: int) -> str:
    """A prompt of about 18 tokens per item with the chat template: 210 items, about 3,800 tokens, nearly
    the whole 4096-token context of a request."""
    return "Summarise the following text in one sentence. " + " ".join(f"Item {i}: the cache stores keys and values for token {i}." for i in range(items))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8,16", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at 1-4 clients (one each above: the run stays bounded)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="threads of every server (default: all cores)")
    parser.add_argument("--servers", default="duospec-batch1,duospec,llama-cpp-server", help="duospec, duospec-batch1, duospec-duo (--method duo), llama-cpp-server, duospec-hf, duospec-hf-batch1 (transformers backend); a --max-batch 1 server's answers are its batching server's reference")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "server" / "batching")
    parser.add_argument("--long-prompt-items", type=int, default=210, help="the latency check's long prompt, about 18 tokens an item (210: about 3,800 tokens, nearly a 4096-token context)")
    parser.add_argument("--reclassify", action="store_true", help="only re-score the mismatches of --out's results.json and rewrite its report")
    args = parser.parse_args()
    if args.reclassify:
        results = json.loads((args.out / "results.json").read_text())
        classify_mismatches(results)
        write(results, args.out)
        return 0
    clients = [int(c) for c in args.clients.split(",")]
    results: dict = {"machine": machine(), "max_tokens": args.max_tokens, "clients": clients, "servers": {}}
    servers = {}
    try:
        for name in args.servers.split(","):  # all up at once (idle ones cost no CPU), so the levels interleave
            started = start_server(name, args.threads)
            if started is None:
                results["servers"][name] = {"skipped": "llama-cpp-python's server extra is not installed (pip install 'llama-cpp-python[server]')"}
                continue
            servers[name] = started
            results["servers"][name] = {"start_line": started[2], "levels": []}
        # Each client count runs on every server in turn before the next count: a machine whose speed
        # drifts over the run (a shared VM) then shifts all servers alike, not the last one alone.
        for count in clients:
            for name, (_, port, _) in servers.items():
                print(f"{name}:", file=sys.stderr, end="", flush=True)
                results["servers"][name]["levels"].append(load_level(port, count, args))
        for name in BATCHING:
            if name in servers:
                results["servers"][name]["latency_checks"] = latency_checks(servers[name][1], args.long_prompt_items)
                results["servers"][name]["curve"] = pass_curve(servers[name][1])
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait(60)
    compare_with_one_at_a_time(results)
    classify_mismatches(results)
    write(results, args.out)
    return 0


def pass_curve(port: int) -> dict[int, float]:
    """The measured target pass seconds by tokens the server budgets with (its /metrics)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return {int(n): float(s) for n, s in re.findall(r'^duospec_target_pass_seconds\{tokens="(\d+)"\} (\S+)$', text, re.MULTILINE)}


def curve_target(results: dict, name: str, clients: int = 8) -> dict | None:
    """The issue's throughput target at `clients`: 80% of what the measured curve allows for that
    batch, clients x t(1) / t(clients) times the one-client rate (of the same server)."""
    entry = results["servers"].get(name, {})
    curve = {int(n): s for n, s in entry.get("curve", results.get("curve", {}) if name == "duospec" else {}).items()}
    levels = {row["clients"]: row for row in entry.get("levels", [])}
    if 1 not in curve or clients not in curve or 1 not in levels or clients not in levels:
        return None
    allowed = clients * curve[1] / curve[clients] * levels[1]["tokens_per_second"]
    measured = levels[clients]["tokens_per_second"]
    return {"clients": clients, "allowed_tokens_per_second": round(allowed, 2), "measured": measured, "share_of_allowed": round(measured / allowed, 2), "target_share": 0.8}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report(results))
    plot(results, out / "throughput.png")
    print(report(results))


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "unknown CPU")
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def start_server(name: str, threads: int | None) -> tuple[subprocess.Popen, int, str] | None:
    """Start one server on a free loopback port; (process, port, its start-up line) or None when absent."""
    thread_flags = [] if threads is None else ["--threads", str(threads)]
    if name == "llama-cpp-server":
        try:
            import llama_cpp.server.app  # noqa: F401  (the server extra)
        except ImportError:
            return None
        from duospec.models.registry import DEFAULT_TARGET, EMBEDDED_MODELS, ensure_gguf

        port = free_port()
        cores = str(threads or len(os.sched_getaffinity(0)))
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(ensure_gguf(EMBEDDED_MODELS[DEFAULT_TARGET])), "--host", "127.0.0.1", "--port", str(port),
                   "--n_threads", cores, "--n_threads_batch", cores, "--n_ctx", "4096"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, process)
        return process, port, " ".join(command[1:])
    command = [sys.executable, "-m", "duospec", "serve", "--port", "0", "--max-queue", "64", "--suffix-scope", "request", *SERVER_FLAGS.get(name, []), *thread_flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in process.stderr:
        if line.strip() and "Loading weights" not in line:  # transformers' progress bars are no start-up line
            lines.append(line.strip())
        found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1(.*)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining its log
            return process, int(found.group(1)), "\n".join(lines)  # its start-up lines: the backend, the costs, the batch
    raise RuntimeError(f"{name} exited before listening ({process.wait()})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not listen in time")


MODEL_IDS: dict[int, str] = {}


def model_id(port: int) -> str:
    """The model id the server lists (GET /v1/models), asked once per server."""
    if port not in MODEL_IDS:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/v1/models")
        MODEL_IDS[port] = json.loads(connection.getresponse().read())["data"][0]["id"]
        connection.close()
    return MODEL_IDS[port]


def ask(port: int, prompt: str, max_tokens: int, **extra) -> dict:
    """One chat request: its status, text, completion tokens and seconds."""
    body = {"model": model_id(port), "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, **extra}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read().decode()
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    if response.status != 200:
        return {"status": response.status, "text": raw[:200], "tokens": 0, "seconds": seconds}
    answer = json.loads(raw)
    return {"status": 200, "text": answer["choices"][0]["message"]["content"], "tokens": answer["usage"]["completion_tokens"], "seconds": seconds}


def load_level(port: int, clients: int, args) -> dict:
    """C clients at once, each sending its requests back to back."""
    per_client = args.requests if clients <= 4 else 1

    def client(number: int) -> list[dict]:
        answers = []
        for turn in range(per_client):
            prompt = prompt_for(clients, number, turn)
            answers.append({"prompt": prompt, **ask(port, prompt, args.max_tokens)})
        return answers

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [answer for answers in pool.map(client, range(clients)) for answer in answers]
    wall = time.perf_counter() - started
    answered = [o for o in outcomes if o["status"] == 200]
    seconds = sorted(o["seconds"] for o in answered)
    row = {
        "clients": clients, "requests": len(outcomes), "answered": len(answered), "refused_503": sum(o["status"] == 503 for o in outcomes),
        "other": sum(o["status"] not in (200, 503) for o in outcomes), "tokens": sum(o["tokens"] for o in answered), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(sum(o["tokens"] for o in answered) / wall, 2),
        "p50_seconds": round(statistics.median(seconds), 2) if seconds else None,
        "p95_seconds": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 2) if seconds else None,
    }
    row["answers"] = {o["prompt"]: o["text"] for o in answered}
    print(f"  {clients:>2} clients: {row['tokens_per_second']} tok/s, p50 {row['p50_seconds']} s, p95 {row['p95_seconds']} s", file=sys.stderr, flush=True)
    return row


def latency_checks(port: int, long_prompt_items: int) -> dict:
    """A 4-token request's seconds beside each disturbance (median of 2), against its quiet seconds
    measured just before that disturbance (median of 3): on a machine whose speed drifts over the
    minutes a long prefill takes, a quiet value from the start would move every ratio with it."""
    def four() -> float:
        answer = ask(port, "Say hi.", 4)
        if answer["status"] != 200:
            raise RuntimeError(f"the 4-token request got {answer['status']}: {answer['text']}")
        return answer["seconds"]

    checks: dict = {"long_prompt_items": long_prompt_items}
    for name, disturb in (("long_prompt", lambda: ask(port, long_prompt(long_prompt_items), 4)), ("first_specexec", lambda: ask(port, PROMPTS[0], 48, method="specexec")), ("slow_clients_100", lambda: slow_clients(port))):
        quiet = statistics.median(four() for _ in range(3))
        with ThreadPoolExecutor(1) as pool:
            background = pool.submit(disturb)
            time.sleep(1.5)
            seconds = statistics.median(four() for _ in range(2))
            disturbance = background.result()
        if disturbance is not None:  # a request: it must have been answered, or nothing was beside the 4-token one
            checks[f"{name}_status"] = disturbance["status"]
            checks[f"{name}_disturbance_seconds"] = round(disturbance["seconds"], 2)
        checks[f"{name}_quiet_seconds"] = round(quiet, 3)
        checks[f"{name}_seconds"] = round(seconds, 3)
        checks[f"{name}_ratio"] = round(seconds / quiet, 2)
        print(f"  4-token request beside {name}: {seconds:.2f} s ({seconds / quiet:.2f}x its quiet {quiet:.2f} s just before)", file=sys.stderr, flush=True)
    return checks


def slow_clients(port: int, count: int = 100, seconds: float = 8.0) -> None:
    """count connections that trickle a request head one byte at a time."""
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    deadline = time.monotonic() + seconds
    index = 0
    while time.monotonic() < deadline:
        for sock in sockets:
            try:
                sock.send(head[index % len(head) : index % len(head) + 1])
            except OSError:
                pass
        index += 1
        time.sleep(0.2)
    for sock in sockets:
        sock.close()


def compare_with_one_at_a_time(results: dict) -> None:
    """Each batching server's answers against its --max-batch 1 server's for the same prompts."""
    for name, reference in BATCHING.items():
        alone = results["servers"].get(reference, {}).get("levels")
        batched = results["servers"].get(name, {}).get("levels")
        if not alone or not batched:
            continue
        for one, many in zip(alone, batched):
            many["mismatches"] = [
                {"prompt": prompt, "text": text, "alone": one["answers"][prompt]} for prompt, text in many["answers"].items() if prompt in one["answers"] and text != one["answers"][prompt]
            ]


def classify_mismatches(results: dict) -> None:
    """Re-score each greedy difference on the target (bench/ties.py): a near-tie or a real difference.
    The answers' token ids are re-encoded from their text (the server returns text).

    A batch cuts prompts into chunks (and scores a request beside others), and llama.cpp's logits
    depend on how its cache was filled. So a gap beyond bench/ties.py's tolerance is also re-scored
    with the prompt and common prefix fed in other chunkings (one pass, 16 tokens then one at a time,
    one at a time): when the two tokens change order between them, the difference is the backend's
    rounding (`flips_with_chunking`), not the batch's doing."""
    import duospec
    from duospec.bench.ties import divergence

    for name, entry in results["servers"].items():
        mismatches = [m for row in entry.get("levels", []) for m in row.get("mismatches", [])]
        if mismatches:
            classify_on(duospec.load(backend="transformers" if name == "duospec-hf" else "auto", progress=False), mismatches, divergence)


def classify_on(pipe, mismatches: list[dict], divergence) -> None:
    """classify_mismatches on one server's backend (its own rounding decides what a near-tie is)."""
    for mismatch in mismatches:
        prompt_ids = pipe.encode([{"role": "user", "content": mismatch["prompt"]}])
        ids_a = pipe.tokenizer.encode(mismatch["alone"], add_special_tokens=False)
        ids_b = pipe.tokenizer.encode(mismatch["text"], add_special_tokens=False)
        found = divergence(pipe, prompt_ids, ids_a, ids_b)
        mismatch.update(position=found.position, margin=found.margin, near_tie=found.is_near_tie)
        if not found.is_near_tie and found.position is not None and found.position < min(len(ids_a), len(ids_b)):
            gaps = chunked_gaps(pipe, [*prompt_ids, *ids_a[: found.position]], ids_a[found.position], ids_b[found.position])
            mismatch.update(gaps_by_chunking=gaps, flips_with_chunking=min(gaps.values()) < 0 < max(gaps.values()))
            mismatch["near_tie"] = mismatch["flips_with_chunking"]


def chunked_gaps(pipe, context: list[int], token_a: int, token_b: int) -> dict[str, float]:
    """logit(token_a) - logit(token_b) after `context`, fed to the target in three chunkings."""
    import torch

    target, n = pipe.target, len(context)
    chunkings = {"one pass": [n], "16 then 1s": [min(16, n)] + [1] * max(0, n - 16), "1s": [1] * n}
    gaps = {}
    for label, sizes in chunkings.items():
        target.reset()
        position = 0
        for size in sizes:
            logits = target.forward(torch.tensor(context[position : position + size]), last_only=True)[-1]
            position += size
        gaps[label] = round(float(logits[token_a] - logits[token_b]), 4)
    target.reset()
    return gaps


def report(results: dict) -> str:
    lines = [f"# duospec serve under load: continuous batching\n\nMachine: {results['machine']}. Chat requests, greedy, {results['max_tokens']} new tokens each.\n"]
    for name, entry in results["servers"].items():
        if "skipped" in entry:
            lines.append(f"- {name}: skipped ({entry['skipped']})")
    lines.append("\n| clients | " + " | ".join(f"{name} tok/s | p50 s | p95 s" for name, entry in results["servers"].items() if "levels" in entry) + " |")
    servers = [(name, entry) for name, entry in results["servers"].items() if "levels" in entry]
    lines.append("|---|" + "---|---|---|" * len(servers))
    for index, clients in enumerate(results["clients"]):
        cells = [f"{e['levels'][index]['tokens_per_second']} | {e['levels'][index]['p50_seconds']} | {e['levels'][index]['p95_seconds']}" for _, e in servers]
        lines.append(f"| {clients} | " + " | ".join(cells) + " |")
    for name, entry in servers:
        ended = [(row["clients"], row["answered"], row["refused_503"], row["other"], len(row.get("mismatches", [])), sum(not m.get("near_tie", False) for m in row.get("mismatches", []))) for row in entry["levels"]]
        flips = [m for row in entry["levels"] for m in row.get("mismatches", []) if m.get("flips_with_chunking")]
        compared = any("mismatches" in row for row in entry["levels"])
        differ = (lambda m, bad: f", {m} differ from one at a time ({bad} not near-ties)") if compared else (lambda m, bad: "")
        lines.append(f"\n{name}: " + "; ".join(f"{c} clients: {a} answered, {r} refused, {o} other{differ(m, bad)}" for c, a, r, o, m, bad in ended))
        for m in flips:
            lines.append(f"\n{name}: a gap of {m['margin']:.3f} at new token {m['position']} (over the 0.25 tolerance) changes sign with the prompt's chunking, {m['gaps_by_chunking']}: a near-tie of llama.cpp's rounding")
        if "latency_checks" in entry:
            lines.append(f"\n{name}, a 4-token request's latency: " + json.dumps(entry["latency_checks"]))
        lines.append(f"\n{name} started as:\n```text\n{entry['start_line']}\n```")
    for name in BATCHING:
        entry = results["servers"].get(name, {})
        curve = entry.get("curve", results.get("curve") if name == "duospec" else None)
        if curve:
            lines.append(f"\nTarget pass seconds by tokens per pass, as {name} measured and budgets with: " + ", ".join(f"t({n}) {s:.3f}" for n, s in sorted((int(n), s) for n, s in curve.items())))
        target = curve_target(results, name)
        if target:
            lines.append(f"\n{name}: at {target['clients']} clients the curve allows {target['allowed_tokens_per_second']} tok/s ({target['clients']} x t(1) / t({target['clients']}) times the one-client rate); measured {target['measured']}: {target['share_of_allowed']:.0%} of it (target 80%).")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in results["servers"].items():
        if "levels" not in entry:
            continue
        counts = [row["clients"] for row in entry["levels"]]
        left.plot(counts, [row["tokens_per_second"] for row in entry["levels"]], marker="o", label=name)
        right.plot(counts, [row["p50_seconds"] for row in entry["levels"]], marker="o", label=name)
    for axis, label in ((left, "total tokens/s"), (right, "p50 seconds per request")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle(f"duospec serve, continuous batching ({results['machine']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
