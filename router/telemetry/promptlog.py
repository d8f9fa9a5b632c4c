"""Prompt and response logs: opt-in, redacted, sampled, written off the event loop.

One JSON line per client request (a cascade writes one line for all its tries), in the
schema of ``docs/observability.md`` (``schema: 1``), which ``kvroute classifier refresh
--from-logs`` reads. Records go to a rotating JSONL file (size-based, ``backups`` kept)
through a queue and a writer thread, and/or onto the request's span as the GenAI
``gen_ai.input.messages`` and ``gen_ai.output.messages`` attributes.

Redaction runs before anything is written: every string in the messages and the answer
passes each rule in order. Headers, API keys of the caller and the router's worker keys
are never part of a record.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from kvroute.router.telemetry.config import PromptLogConfig
from kvroute.router.telemetry.jsonl import JsonLines

SCHEMA = 1
_CUT = "…[cut]"


def _checked(replace: str, check: Callable[[str], bool]) -> Callable[[re.Match[str]], str]:
    return lambda m: replace if check(m.group(0)) else m.group(0)


class PromptLog:
    def __init__(self, cfg: PromptLogConfig, rng: Callable[[], float] = random.random):
        self.cfg = cfg
        self._rng = rng
        self._file = JsonLines(cfg.file, "kvroute.prompts") if cfg.file is not None else None

    def sampled(self, model: str, *, tenants_known: bool) -> bool:
        """Whether to capture this request's answer: it may be logged. ``tenants_known``:
        governance runs, so a tenant opt-in can apply (decided once the tenant is known)."""
        cfg = self.cfg
        if not (cfg.enabled or model in cfg.models or (cfg.tenants and tenants_known)):
            return False
        return cfg.sample_rate >= 1.0 or self._rng() < cfg.sample_rate

    def wanted(self, model: str, tenant: str | None) -> bool:
        cfg = self.cfg
        return cfg.enabled or model in cfg.models or (tenant is not None and tenant in cfg.tenants)

    # ---- redaction ---------------------------------------------------------------------

    def redact(self, text: str) -> str:
        for rule in self.cfg.redactions:
            if rule.check is None:
                text = rule.pattern.sub(rule.replace, text)
            else:
                text = rule.pattern.sub(_checked(rule.replace, rule.check), text)
        if len(text) > self.cfg.max_chars:
            text = text[:self.cfg.max_chars] + _CUT
        return text

    def redact_value(self, value: Any) -> Any:
        """Every string in a JSON value redacted (message contents, content parts, tool calls)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        return value

    def request_part(self, body: dict) -> dict:
        if isinstance(body.get("messages"), list):
            part = {"messages": self.redact_value(body["messages"])}
            if isinstance(body.get("batch"), list):  # a chat batch's other conversations
                part["batch"] = self.redact_value(body["batch"])
            return part
        part = {"prompt": self.redact_value(body.get("prompt"))}
        if isinstance(body.get("items"), list):  # a generative scoring request's items
            part["items"] = self.redact_value(body["items"])
        return part

    # ---- output -----------------------------------------------------------------------

    def write(self, record: dict) -> None:
        """Queue one record for the file (never blocks the loop)."""
        if self._file is not None:
            self._file.write(record)

    def close(self) -> None:
        """Flush what is queued and close the file (blocks: run it off the loop)."""
        if self._file is not None:
            self._file.close()
            self._file = None
