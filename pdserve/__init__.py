"""pdserve: prefill-decode disaggregated LLM serving.

Layout: each top-level folder of the checkout with code is the subpackage `pdserve.<folder>` (installs map
them in pyproject.toml). Those folders have no `__init__.py` at their root: seen from the checkout root on
`sys.path` (`python -m` run there, Ray workers of a driver started there) they are at most namespace
portions, which an installed regular package of the same name (`kernels`, `router`, ...) always beats.
In a checkout (editable install, or run from its root) the root joins this package's path, so that
`pdserve.<folder>` is found there (docs/decisions.md: "Top-level folders are namespace portions").
"""
import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")):
    __path__.append(_ROOT)
