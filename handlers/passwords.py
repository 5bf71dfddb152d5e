"""Password hashing with stdlib scrypt, off the event loop so one slow hash never stalls the rest.

A stored hash is `scrypt$<n>$<r>$<p>$<salt b64>$<key b64>`: the parameters travel with it, so
they can be raised later without invalidating old hashes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

scrypt_n = 2**14  # 16 MiB of memory per hash (128 * n * r bytes)
scrypt_r = 8
scrypt_p = 1
salt_bytes = 16
key_bytes = 32
hash_threads_max = 2
"""hashlib.scrypt releases the GIL; more threads than cores would only queue in the kernel."""

hash_thread_nice = 19
"""Hashing threads run at a lower priority than the event loop thread: on a busy machine the
kernel gives the loop the CPU first, so reads keep their latency while hashes queue."""


def _lower_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), hash_thread_nice)  # Linux: per thread


_executor = ThreadPoolExecutor(max_workers=hash_threads_max, thread_name_prefix="scrypt", initializer=_lower_priority)


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=key_bytes)


def _hash_sync(password: str) -> str:
    salt = secrets.token_bytes(salt_bytes)
    key = _derive(password, salt, scrypt_n, scrypt_r, scrypt_p)
    encoded_salt, encoded_key = base64.b64encode(salt).decode(), base64.b64encode(key).decode()
    return f"scrypt${scrypt_n}${scrypt_r}${scrypt_p}${encoded_salt}${encoded_key}"


def _verify_sync(password: str, stored: str) -> bool:
    scheme, n, r, p, salt, key = stored.split("$")
    assert scheme == "scrypt"
    derived = _derive(password, base64.b64decode(salt), int(n), int(r), int(p))
    return hmac.compare_digest(derived, base64.b64decode(key))


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_executor, _hash_sync, password)


async def verify_password(password: str, stored: str | None) -> bool:
    """Constant work whether or not there is a stored hash: an unknown email costs one full hash too."""
    against = stored if stored is not None else _UNKNOWN_USER_HASH
    matches = await asyncio.get_running_loop().run_in_executor(_executor, _verify_sync, password, against)
    return matches and stored is not None


_UNKNOWN_USER_HASH = _hash_sync(secrets.token_urlsafe(16))
