"""The updater's error, in a module of its own: what reads the host's update state (the
metrics, the agent service) does not load the TUF client and its crypto libraries."""

from __future__ import annotations

from cerulean.errors import CeruleanError


class UpdateError(CeruleanError):
    """The update could not go ahead; the host is unchanged."""
