"""Nearest-neighbour search over stored prompts, one partition per tenant, model and context.

A partition holds the entries whose requests share a tenant (or API key), a model and a
context signature (semantic.py): a lookup only ever searches its own partition, so
isolation between tenants is structural, not a filter.

Search is exact (a numpy dot product over the partition's unit vectors) up to
``FLAT_MAX`` entries, where it is faster than a graph; a larger partition moves to an
hnswlib HNSW graph (inner product, M=16, ef=64), whose lookups stay well under a
millisecond at tens of thousands of entries (docs/cache.md#semantic-cache has the
measurements: ``python -m kvroute.benchmarks.semantic_calibration --ann``). hnswlib is the
``kvroute[semantic]`` extra (it builds from source); without it every partition stays
exact, which costs linear time in its size.

Entries expire (``expires_at`` on the injected clock) and the index holds at most
``max_entries``, oldest out first. Not thread-safe: the event loop owns it; only embedding
runs in an executor.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvroute.router.governance.clock import Clock

FLAT_MAX = 2048  # entries a partition searches by brute force before it moves to HNSW


def _have_hnswlib() -> bool:
    try:
        import hnswlib  # type: ignore[import-untyped]  # noqa: F401  # the kvroute[semantic] extra
    except ImportError:
        return False
    return True


HNSWLIB = _have_hnswlib()  # without it, partitions stay flat (exact; linear in their size)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF = 16, 100, 64


@dataclass(frozen=True)
class Stored:
    key: str  # the answer's key in the response-cache store
    text: str  # the stored prompt's last user turn, for the near-opposite check
    vector: np.ndarray  # unit length, float32
    expires_at: float


class _Partition:
    def __init__(self, dim: int):
        self.dim = dim
        self.rows: list[Stored] = []  # flat: row i of ``matrix`` (whose capacity doubles as it fills)
        self.matrix = np.empty((16, dim), dtype=np.float32)
        self.graph: Any = None  # hnswlib.Index once the partition outgrows FLAT_MAX
        self.labels: dict[int, Stored] = {}  # graph label -> entry
        self.label_of: dict[str, int] = {}
        self.next_label = 0

    def __len__(self) -> int:
        return len(self.labels) if self.graph is not None else len(self.rows)

    def add(self, entry: Stored) -> None:
        if self.graph is not None:
            self._graph_add([entry])
            return
        if len(self.rows) == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
        self.matrix[len(self.rows)] = entry.vector
        self.rows.append(entry)
        if len(self.rows) > FLAT_MAX and HNSWLIB:
            self._to_graph()

    def remove(self, key: str) -> None:
        if self.graph is not None:
            label = self.label_of.pop(key, None)
            if label is not None:
                del self.labels[label]
                self.graph.mark_deleted(label)
            return
        for i, row in enumerate(self.rows):
            if row.key == key:  # the last row takes its place
                last = len(self.rows) - 1
                self.rows[i] = self.rows[last]
                self.matrix[i] = self.matrix[last]
                self.rows.pop()
                return

    def search(self, vector: np.ndarray, k: int) -> list[tuple[float, Stored]]:
        if self.graph is not None:
            k = min(k, len(self.labels))
            if k == 0:
                return []
            labels, distances = self.graph.knn_query(vector, k=k)
            # hnswlib's "ip" distance is 1 - inner product
            return [(1.0 - float(d), self.labels[int(label)]) for label, d in zip(labels[0], distances[0], strict=True)]
        if not self.rows:
            return []
        scores = self.matrix[: len(self.rows)] @ vector
        top = np.argsort(-scores)[:k] if len(scores) > k else np.argsort(-scores)
        return [(float(scores[i]), self.rows[i]) for i in top]

    def _to_graph(self) -> None:
        import hnswlib  # the kvroute[semantic] extra

        self.graph = hnswlib.Index(space="ip", dim=self.dim)
        self.graph.init_index(max_elements=2 * FLAT_MAX, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION,
                              allow_replace_deleted=True)
        self.graph.set_ef(HNSW_EF)
        self.graph.set_num_threads(1)
        rows, self.rows, self.matrix = self.rows, [], np.empty((0, self.dim), dtype=np.float32)
        self._graph_add(rows)

    def _graph_add(self, entries: list[Stored]) -> None:
        graph = self.graph
        if len(self.labels) + len(entries) > graph.get_max_elements():
            graph.resize_index(2 * (len(self.labels) + len(entries)))
        labels = list(range(self.next_label, self.next_label + len(entries)))
        self.next_label += len(entries)
        graph.add_items(np.stack([e.vector for e in entries]), labels, replace_deleted=True)
        for label, entry in zip(labels, entries, strict=True):
            self.labels[label] = entry
            self.label_of[entry.key] = label


class SemanticIndex:
    """The stored prompts of one model, partitioned by (namespace, signature)."""

    def __init__(self, dim: int, max_entries: int, clock: Clock | None = None):
        self.dim = dim
        self.max_entries = max_entries
        self.clock = clock or Clock()
        self.partitions: dict[tuple[str, str], _Partition] = {}
        self.order: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()  # key -> partition

    def __len__(self) -> int:
        return len(self.order)

    def add(self, namespace: str, signature: str, entry: Stored) -> None:
        part_key = (namespace, signature)
        if entry.key in self.order:  # re-stored (a refresh, or an entry read back from Redis)
            self.remove(entry.key)
        self.partitions.setdefault(part_key, _Partition(self.dim)).add(entry)
        self.order[entry.key] = part_key
        while len(self.order) > self.max_entries:
            self.remove(next(iter(self.order)))

    def remove(self, key: str) -> None:
        part_key = self.order.pop(key, None)
        if part_key is None:
            return
        part = self.partitions[part_key]
        part.remove(key)
        if len(part) == 0:
            del self.partitions[part_key]

    def search(self, namespace: str, signature: str, vector: np.ndarray, k: int = 4) -> list[tuple[float, Stored]]:
        """Up to ``k`` live entries of the partition, most similar first (expired ones are dropped)."""
        part = self.partitions.get((namespace, signature))
        if part is None:
            return []
        now = self.clock.time()
        found = part.search(vector, k)
        for _, entry in found:
            if entry.expires_at <= now:
                self.remove(entry.key)
        return [(score, entry) for score, entry in found if entry.expires_at > now]
