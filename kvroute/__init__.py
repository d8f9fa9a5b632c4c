"""kvroute: a prefix-aware, cost-aware router for vLLM fleets.

The code lives in three subpackages, kept at the repository's top level and installed
under this one name (``pyproject.toml`` maps them):

- ``kvroute.router``: the OpenAI-compatible router (``kvroute serve``);
- ``kvroute.classifier``: the tier classifier and the cascade's answer scorer;
- ``kvroute.benchmarks``: routing, overhead and governance benchmarks.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvroute")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
