"""The one exception type whose message is shown to users as-is.

Every failure a user can cause or fix (bad input, a refused signature, a
missing file, a network outage) is raised as :class:`CeruleanError` with one
clear sentence; the CLI prints it and exits non-zero, never with a traceback.
"""


class CeruleanError(Exception):
    """An error meant for the user: its message is one complete sentence."""


class VerificationError(CeruleanError):
    """A signature, hash or size did not match what a trusted source says."""


class NetworkError(CeruleanError):
    """The archive could not be reached or kept failing after retries."""
