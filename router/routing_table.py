"""The routing table: hardcode a tier or a model per task type.

``routes:`` (top level of the router config) is a list of rules, tried in order; the first
that matches a request decides, the rest are not read::

    routes:
      - {name: summaries-cheap, match: {feature: summarise}, tier: small}
      - {name: research-big, match: {agent: [research, planner]}, tier: large}
      - {name: legacy-names, model: "gpt-4.*", to_model: llama-70b}

``match`` holds attribution tags (``agent``, ``task``, ``feature``, ``user``: the
``x-kvroute-<tag>`` headers) with a value or a list of values; ``model`` is a regular
expression the requested model name must match in full. Every condition given must hold;
a rule with neither matches every request. A rule sends the request to ``tier`` (of the
requested model, or of ``to_model``) and/or to another configured model (``to_model``).

Precedence (``pipeline.choose_tier``): the ``x-kvroute-tier`` header, then this table,
then the model's classifier, then its first tier. A rule naming a tier that the model has
not got is skipped. A ``mode: cascade`` model is walked by the cascade, not this table.
The rule that decided is kept on the request (``ROUTE_RULE``) for traces and logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError

TAGS = ("agent", "task", "feature", "user")
# The name of the routing-table rule that chose the request's tier or model (absent: none did).
ROUTE_RULE = web.RequestKey("kvroute_route_rule", str)


@dataclass(frozen=True)
class RouteRule:
    name: str
    match: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    model: re.Pattern[str] | None = None  # on the model name the client sent
    tier: str | None = None
    to_model: str | None = None

    def matches(self, model: str, headers: Mapping[str, str]) -> bool:
        if self.model is not None and not self.model.fullmatch(model):
            return False
        return all(headers.get(f"x-kvroute-{tag}") in values for tag, values in self.match.items())


@dataclass(frozen=True)
class RoutingTable:
    rules: tuple[RouteRule, ...] = ()

    def match(self, model: str, headers: Mapping[str, str], tiers_of: Mapping[str, tuple[str, ...]]
              ) -> RouteRule | None:
        """The first rule for this request whose tier exists (``tiers_of``: model -> tier names)."""
        for rule in self.rules:
            if rule.matches(model, headers):
                target = rule.to_model or model
                if rule.tier is None or rule.tier in tiers_of.get(target, ()):
                    return rule
        return None


def parse_routes(raw: Any, key: str, tiers_of: Mapping[str, tuple[str, ...]]) -> RoutingTable:
    """Validate ``routes:``; ``tiers_of`` maps each configured model to its tier names."""
    rules = []
    for i, r in enumerate(v.items(raw, key, "expected a list of {name, match, model, tier, to_model}")):
        rkey = f"{key}[{i}]"
        r = v.section(r, ("name", "match", "model", "tier", "to_model"), rkey)
        name = v.required(r, "name", str, rkey)
        match: dict[str, tuple[str, ...]] = {}
        for tag, x in v.section(r.get("match"), TAGS, f"{rkey}.match").items():
            values = (x,) if isinstance(x, str) and x else v.str_list(x, f"{rkey}.match.{tag}")
            if not values:
                raise ConfigError(f"{rkey}.match.{tag}", "expected a non-empty string or list of strings")
            match[tag] = values
        pattern = v.get(r, "model", str, rkey)
        compiled = None
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{rkey}.model", f"invalid regular expression: {exc}") from None
        tier, to_model = v.get(r, "tier", str, rkey), v.get(r, "to_model", str, rkey)
        if tier is None and to_model is None:
            raise ConfigError(rkey, "give tier, to_model or both")
        if to_model is not None and to_model not in tiers_of:
            raise ConfigError(f"{rkey}.to_model", f"unknown model {to_model!r}; valid: {', '.join(tiers_of)}")
        if tier is not None:
            candidates = [to_model] if to_model else list(tiers_of)
            if not any(tier in tiers_of[m] for m in candidates):
                where = f"model {to_model!r}" if to_model else "any model"
                raise ConfigError(f"{rkey}.tier", f"{where} has no tier {tier!r}")
        rules.append(RouteRule(name, match, compiled, tier, to_model))
    v.unique([r.name for r in rules], lambda i: f"{key}[{i}].name", "route")
    return RoutingTable(tuple(rules))
