"""Policy registry: one canonical name per policy, no aliases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvroute.router.errors import ConfigError
from kvroute.router.policies.base import Policy, PolicyDeps
from kvroute.router.policies.consistent_hash import ConsistentHashPolicy
from kvroute.router.policies.least_loaded import LeastLoadedPolicy
from kvroute.router.policies.prefix import PrefixPolicy
from kvroute.router.policies.round_robin import RoundRobinPolicy

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobinPolicy, LeastLoadedPolicy, ConsistentHashPolicy, PrefixPolicy)
}


def create_policy(name: str, deps: PolicyDeps, options: Mapping[str, Any] | None = None) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError("policy", f"unknown policy {name!r}; valid: {', '.join(POLICIES)}") from None
    cls.validate_options(options or {}, "policy_options")
    return cls(deps, options)
