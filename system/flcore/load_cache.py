"""Slow-to-load, read-only objects kept between the runs of one experiment (`-t`), handed to each run's server."""


class LoadCache:
    """One entry per kind of object: asking for the same kind with another key drops the old entry before loading
    the new one, so at most one of each kind (e.g. one Stable Diffusion pipeline) is in memory."""

    def __init__(self):
        self._entries = {}

    def get(self, kind, key, load):
        """The object of `kind` loaded for `key`; calls `load()` only when it is not already held."""
        held = self._entries.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        self._entries.pop(kind, None)
        value = load()
        self._entries[kind] = (key, value)
        return value
