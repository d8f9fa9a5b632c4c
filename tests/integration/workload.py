"""A small shared-prefix workload for integration tests: fresh prefixes every call."""

from __future__ import annotations

import random

WORDS = ("cache router worker token prefix block model request stream budget tier queue "
         "latency memory policy engine server client schema agent session").split()


def system_prompt(rng: random.Random, words: int) -> str:
    nonce = rng.getrandbits(64)
    return f"[{nonce:x}] You are assistant {nonce % 997}. " + " ".join(rng.choice(WORDS) for _ in range(words))


def shared_prefix_requests(seed: int, groups: int, questions: int, words: int = 600) -> list[tuple[int, list[dict]]]:
    """(group, messages) pairs: ``groups`` long system prompts x ``questions``, shuffled."""
    rng = random.Random(seed)
    systems = [system_prompt(rng, words) for _ in range(groups)]
    requests = [
        (g, [{"role": "system", "content": systems[g]},
             {"role": "user", "content": f"Question {q} for group {g}: {rng.choice(WORDS)}?"}])
        for g in range(groups)
        for q in range(questions)
    ]
    rng.shuffle(requests)
    return requests
