"""lowbit runtime: load and run artifacts, baselines, measurement."""


def load(directory):
    """Load an artifact directory (see ``runtime.artifact.load``)."""
    from runtime.artifact import load as _load

    return _load(directory)
