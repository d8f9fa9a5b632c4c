"""Policy registry: one canonical name per policy, no aliases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.errors import ConfigError
from router.policies.base import Policy, PolicyDeps
from router.policies.consistent_hash import ConsistentHashPolicy
from router.policies.least_loaded import LeastLoadedPolicy
from router.policies.prefix import PrefixPolicy
from router.policies.round_robin import RoundRobinPolicy

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
