"""Loop detection per session: an agent that keeps calling the same tool, or keeps sending
the same prompt, is spending money without making progress.

Each request leaves a signature in its session's list of the last ``window`` requests:
the tools its latest assistant turn called (from the request's own messages) and a
fingerprint of its last message, normalized (case, digits, whitespace) so that prompts
differing only in counters or timestamps match. When more than ``ratio`` of a full
window share one tool or one fingerprint, the session is looping. What happens then is
configured: ``flag`` (alert only), ``inject`` (append a system message asking the agent
to reconsider), ``throttle`` (delay) or ``halt`` (refuse this and every later request of
the session with 429 ``loop_detected``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

from kvroute.router.prefix import normalize_content

_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")
_SEP = "\x1f"


def signature(body: dict) -> str:
    tools = ""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        for m in reversed(messages):
            calls = m.get("tool_calls") if m.get("role") == "assistant" else None
            if calls:
                names = sorted(str((c.get("function") or {}).get("name") or "") for c in calls
                               if isinstance(c, dict))
                tools = ",".join(names)
                break
        last = messages[-1]
        text = normalize_content(last.get("content"))
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else repr(prompt)[:4096]
        if "items" in body:  # generative scoring: one query, new items each time, is no loop
            text += repr(body["items"])[:4096]
    text = _SPACE.sub(" ", _DIGITS.sub("0", text.lower())).strip()
    return tools + _SEP + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def is_loop(entries: list[str], window: int, ratio: float) -> str | None:
    """Why the session loops (``tool <name>`` or ``repeated prompt``), or None."""
    if len(entries) < window:
        return None
    entries = entries[:window]
    tools = Counter(e.split(_SEP)[0] for e in entries)
    tool, count = tools.most_common(1)[0]
    if tool and count / window > ratio:
        return f"tool {tool}"
    _prompt, count = Counter(e.split(_SEP)[1] for e in entries).most_common(1)[0]
    if count / window > ratio:
        return "repeated prompt"
    return None


def inject(body: dict, message: str) -> dict:
    """The body with a system message appended (chat only)."""
    if not isinstance(body.get("messages"), list):
        return body
    return {**body, "messages": [*body["messages"], {"role": "system", "content": message}]}
