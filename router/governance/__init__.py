"""Cost governance: API keys and tenants, attribution tags, budgets with reservations,
the kill switch, alerts, loop detection and the spend ledger.

The request path uses one facade, ``Governor`` (``governor.py``); state lives in a
``MemoryStore`` (one replica) or a ``RedisStore`` (several). ``config.py`` parses the
``governance:`` config section and documents its defaults. Nothing is imported here, so
``router.config`` can import ``router.governance.config`` without a cycle.
"""
