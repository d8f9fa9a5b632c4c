"""The response cache (docs/cache.md): a stage of the request path, before tier choice.

``config.py`` the ``cache:`` section; ``policy.py`` what is cacheable and its key;
``store.py`` in-process LRU or Redis; ``replay.py`` entries and replays (JSON or SSE);
``tap.py`` what a miss's upstream call produced; ``stage.py`` the stage itself.
"""
