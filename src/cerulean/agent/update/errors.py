"""The updater's errors, in a module of their own: what reads the host's update state (the
metrics, the agent service) does not load the TUF client and its crypto libraries."""

from __future__ import annotations

from cerulean.errors import CeruleanError


class UpdateError(CeruleanError):
    """The update could not go ahead; the host is unchanged."""


class RefusedError(UpdateError):
    """The repository's metadata or a payload was refused: expired, older than what the
    host trusts, not signed by the keys it trusts, or not matching its signed hash."""


class TransientError(UpdateError):
    """Nothing was wrong with what the repository signed: it could not be reached or read
    in time, or the host lacked room. Such a failure does not count against a release."""
