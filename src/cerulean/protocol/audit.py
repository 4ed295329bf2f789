"""The audit-trail entry format shared by the agent's trail and the fleet's admin log.

An entry is canonical JSON (sorted keys, no spaces); its ``hash`` is the sha256
of the entry without ``hash``, and ``prev`` is the hash of the entry before it
(:data:`GENESIS` for the first), so an edit, removal or reordering breaks the
chain where it was made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS = "0" * 64


def canonical(entry: Mapping[str, Any]) -> bytes:
    # A file name that is not UTF-8 arrives surrogate-escaped; backslashreplace writes it
    # as a JSON \\udcXX escape, which reads back to the same text (and the same bytes).
    return json.dumps(entry, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "backslashreplace")


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()
