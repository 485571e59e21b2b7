"""vLLM's prefix cache kept apart per API key.

vLLM reuses the cached prefix of any earlier prompt, whoever sent it: a key
could time its own requests to learn whether another key's prompt began a
certain way (a first token back sooner means a cached prefix). vLLM's
``cache_salt`` keeps requests with different salts from sharing cached
blocks. On a gateway with API keys each request is salted with a value only
this replica can make from its key (and from the client's own salt, which so
still separates that key's users from each other), so that no key shares a
cached prefix with another and none can name another's salt. On an open
gateway there are no tenants to keep apart and nothing changes; a key's own
requests keep sharing their prefixes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

# This process's own: a salt made from it names no key to anyone else.
_SECRET = secrets.token_bytes(32)


def salt_for(owner: str, given: str | None) -> str:
    """The salt of a request of key ``owner`` whose client sent ``given``."""
    return hmac.new(_SECRET, json.dumps([owner, given]).encode(), hashlib.sha256).hexdigest()


def salt(parsed: Any, owner: str) -> None:
    """Salts ``parsed`` (vLLM's validated request, whose ``cache_salt`` vLLM
    has checked) for key ``owner``; nothing for "" (no keys)."""
    if owner and hasattr(parsed, "cache_salt"):
        parsed.cache_salt = salt_for(owner, parsed.cache_salt)
