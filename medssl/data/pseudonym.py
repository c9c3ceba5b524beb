"""Pseudonymous, stable identifiers: keyed hashes (HMAC-SHA256) of raw identifiers.

The salt is a secret: with it, a low-entropy identifier such as a PatientID could be
confirmed by brute force, so it never goes into a manifest, a log or a run. It comes from
(in order) an explicit value, the ``MEDSSL_SALT`` environment variable, or a salt file
(created with random bytes on first use, readable by its owner only).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SALT_ENV = "MEDSSL_SALT"
SALT_FILE_NAME = ".medssl_salt"


def resolve_salt(explicit: str | None, salt_file: Path) -> tuple[str, str]:
    """Return ``(salt, origin)`` where ``origin`` says where the salt came from (never the salt)."""
    if explicit:
        return explicit, "command line"
    env = os.environ.get(SALT_ENV)
    if env:
        return env, f"${SALT_ENV}"
    if salt_file.exists():
        value = salt_file.read_text(encoding="utf-8").strip()
        if not value:
            raise ValueError(f"{salt_file}: salt file is empty; delete it to create a new one")
        return value, str(salt_file)
    salt_file.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    tmp = salt_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    os.replace(tmp, salt_file)
    return value, f"{salt_file} (new)"


def pseudonym(raw: str, salt: str, prefix: str = "", length: int = 16) -> str:
    """Keyed hash of ``raw``: stable for one salt, not reversible without it.

    >>> pseudonym("PGBM-003", "s") == pseudonym("PGBM-003", "s")
    True
    """
    digest = hmac.new(salt.encode(), raw.encode(), hashlib.sha256).hexdigest()
    return prefix + digest[:length]


def digest(raw: str, length: int = 16) -> str:
    """Unkeyed SHA-256 digest, for high-entropy values (UIDs) that only need to be matched again."""
    return hashlib.sha256(raw.encode()).hexdigest()[:length]
