"""Running requests on batching lanes from test threads (tests/test_batching*.py): each lane's thread
takes the next job as it finishes the last, so requests join and leave while others generate."""

from __future__ import annotations

import threading

import torch

PROMPTS = ["w1 w2 w3", "w5 w9 w5 w9 w5", "w20 w21 w22 w23 w24 w25 w26 w27 w28 w29 w30 w31", "w40", "w7 w7 w8", "w3 w1 w4 w1 w5 w9 w2 w6"]
# (method, options): fixed budgets, so no request measures costs (a lane never measures)
REQUESTS = [
    ("ar", {}),
    ("sd", {"gamma": 3}),
    ("pld", {"gamma": 4}),
    ("suffix", {"gamma": 8}),
    ("specexec", {"tree_budget": 12, "tree_depth": 4}),
    ("multiseq", {"gamma": 3}),
]


def run_batched(lanes, joint, jobs, max_new_tokens: int = 24):
    """Answer `jobs` (prompt, method, options) on the lanes, one thread per lane; {(prompt, method): token ids}."""
    answers, errors, lock = {}, [], threading.Lock()
    queue = list(jobs)

    def worker(lane) -> None:
        while True:
            with lock:
                if not queue:
                    return
                prompt, method, options = queue.pop(0)
            try:
                with joint.member():
                    result = lane.generate(prompt, method=method, max_new_tokens=max_new_tokens, **options)
                answers[(prompt, method)] = result.token_ids
            except BaseException as error:  # reported below: a thread's exception is otherwise lost
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return answers


def sampled_counts(lanes, joint, prompt, samples: int, vocab: int, lenience: float) -> torch.Tensor:
    """Counts of new tokens 2 and 3 of `samples` seeded sd generations (gamma 2) answered by the lanes at once."""
    counts = torch.zeros(vocab, vocab)
    seeds = list(range(samples))
    lock = threading.Lock()

    def worker(lane) -> None:
        while True:
            with lock:
                if not seeds:
                    return
                seed = seeds.pop()
            with joint.member():
                tokens = lane.generate(prompt, method="sd", gamma=2, max_new_tokens=3, temperature=1.0, seed=seed, lenience=lenience).token_ids
            with lock:
                counts[tokens[1], tokens[2]] += 1

    threads = [threading.Thread(target=worker, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert counts.sum() == samples
    return counts


def answerer(joint, answers: dict, max_new_tokens: int = 24):
    """answer(lane, prompt, method, options): one request on a lane, as a member of `joint`; its
    tokens land in answers[(prompt, method)]."""

    def answer(lane, prompt, method, options) -> None:
        with joint.member():
            answers[(prompt, method)] = lane.generate(prompt, method=method, max_new_tokens=max_new_tokens, **options).token_ids

    return answer


def newcomer_during(monkeypatch, pass_class, newcomer: threading.Thread, starts_it, stop_raised) -> list:
    """Let `newcomer` (a thread that joins the batch) start during the first joint pass for which
    starts_it(passes) holds, and wait (at most 10 s) until its join has raised the stop flag
    (stop_raised()). Returns the list of every joint pass run from then on, as it fills:
    (outcome "ran" | "stopped", joint key, {"lane i": (tokens, last_only)})."""
    from duospec.models.joint import PassPreempted

    runs: list = []
    real_run = pass_class.run_together

    def run_together(passes) -> None:
        if newcomer.ident is None and starts_it(passes):
            newcomer.start()
            for _ in range(10_000):
                if stop_raised():
                    break
                threading.Event().wait(0.001)
        sizes = {p.model.name.split("[")[-1].rstrip("]"): (len(p.token_ids), p.last_only) for p in passes}
        try:
            real_run(passes)
            outcome = "ran"
        except PassPreempted:
            outcome = "stopped"
            raise
        finally:
            if newcomer.ident is not None:
                runs.append((outcome, passes[0].joint_key, sizes))

    monkeypatch.setattr(pass_class, "run_together", staticmethod(run_together))
    return runs
