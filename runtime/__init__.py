"""lowbit runtime: the bottom layer.  Loading and running artifacts (artifact, runner, io,
remote), the shared plain types (types, errors, progress) and the numpy golden reference.  It
imports nothing from the compiler; the backends' runners plug in through codegen/registry.py.

``load`` is imported lazily (CLI start-up time: ``lowbit --help`` runs before TVM loads)."""


def load(directory):
    """Load an artifact directory (see ``runtime.artifact.load``)."""
    from runtime.artifact import load as _load

    return _load(directory)
