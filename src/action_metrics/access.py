"""Who may do what on the HTTP endpoint: bearer tokens, the towns each may touch, and whether it reads
or writes.

Tokens come from `ACTION_METRICS_API_TOKEN` (one token, every town) and `ACTION_METRICS_API_TOKENS`
(`[SCOPES:]TOKEN:TOWN[,TOWN...]` entries). A token reads unless its entry starts with a scope list
naming `write`: a dashboard token configured before tokens could write must not start writing after
an upgrade. `SCOPES` is `read`, `write` or `read,write`; a token has at least 16 characters, so a
scope list is never mistaken for one.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from action_metrics.errors import TokenConfigError

TOKEN_VARIABLE: Final = "ACTION_METRICS_API_TOKEN"
TOKENS_VARIABLE: Final = "ACTION_METRICS_API_TOKENS"
MIN_TOKEN_LENGTH: Final = 16
ALL_TOWNS: Final = "*"

_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750's token68: what can travel in `Authorization: Bearer`."""


class Scope(enum.StrEnum):
    """What a token may do: read a town's figures, or write metrics into it."""

    READ = "read"
    WRITE = "write"


READ_ONLY: Final = frozenset({Scope.READ})
EVERY_SCOPE: Final = frozenset(Scope)


def _digest(token: str) -> bytes:
    # Compare fixed-length digests, so neither a token's length nor its characters leak.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """One bearer token, the towns it may touch (None: every town), and what it may do there."""

    digest: bytes
    towns: frozenset[str] | None
    scopes: frozenset[Scope] = READ_ONLY

    def allows(self, town_id: str) -> bool:
        return self.towns is None or town_id in self.towns

    def permits(self, scope: Scope) -> bool:
        return scope in self.scopes


UNRESTRICTED: Final = TokenGrant(b"", None, EVERY_SCOPE)
"""What `--insecure` grants to anyone: every town, read and write."""


def _scopes(text: str) -> frozenset[Scope] | None:
    """The scopes of a `read,write` prefix; None when `text` is not one (it is a token)."""
    words = [word.strip() for word in text.split(",")]
    if not all(word in Scope._value2member_map_ for word in words):
        return None
    return frozenset(Scope(word) for word in words)


@dataclass(frozen=True, slots=True)
class ApiTokens:
    """The bearer tokens the endpoint accepts; only their SHA-256 digests are kept."""

    grants: tuple[TokenGrant, ...]

    @staticmethod
    def _grant(token: str, towns: frozenset[str] | None, scopes: frozenset[Scope] = READ_ONLY) -> TokenGrant:
        if len(token) < MIN_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
            raise TokenConfigError(
                f"an API token must be at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ + / "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return TokenGrant(_digest(token), towns, scopes)

    @classmethod
    def single(cls, token: str) -> ApiTokens:
        """One token that reads every town."""
        return cls((cls._grant(token, None),))

    @classmethod
    def parse(cls, spec: str) -> ApiTokens:
        """`[SCOPES:]TOKEN:TOWN[,TOWN...]` entries separated by `;` or newlines; `TOKEN:*` is every
        town; SCOPES is `read` (the default), `write` or `read,write`."""
        grants: list[TokenGrant] = []
        for entry in re.split(r"[;\n]", spec):
            entry = entry.strip()
            if not entry:
                continue
            first, _, rest = entry.partition(":")
            scopes = _scopes(first)
            if scopes is None:
                scopes = READ_ONLY
            else:
                entry = rest
            token, colon, towns_text = entry.partition(":")
            towns = [town.strip() for town in towns_text.split(",") if town.strip()]
            if not colon or not towns:
                raise TokenConfigError(
                    f"{TOKENS_VARIABLE}: expected [read|write|read,write:]TOKEN:TOWN[,TOWN...] or TOKEN:* "
                    "in each ';'-separated entry, got an entry without towns"
                )
            towns_allowed = None if ALL_TOWNS in towns else frozenset(towns)
            grants.append(cls._grant(token.strip(), towns_allowed, scopes))
        digests = [grant.digest for grant in grants]
        if len(set(digests)) != len(digests):
            raise TokenConfigError(f"{TOKENS_VARIABLE}: the same token is listed twice")
        return cls(tuple(grants))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ApiTokens:
        """`ACTION_METRICS_API_TOKEN` (every town) and `ACTION_METRICS_API_TOKENS` (per-town), together."""
        environ = os.environ if environ is None else environ
        grants: list[TokenGrant] = []
        token = environ.get(TOKEN_VARIABLE, "").strip()
        if token:
            grants.extend(cls.single(token).grants)
        grants.extend(cls.parse(environ.get(TOKENS_VARIABLE, "")).grants)
        return cls(tuple(grants))

    def grant_for(self, presented: str) -> TokenGrant | None:
        """The grant of a presented token, compared in constant time against every configured one."""
        digest = _digest(presented)
        found: TokenGrant | None = None
        for grant in self.grants:
            if secrets.compare_digest(digest, grant.digest):
                found = grant
        return found

    def __bool__(self) -> bool:
        return bool(self.grants)


# --- the FastAPI dependency ---------------------------------------------------------------------

bearer_scheme: Final = HTTPBearer(auto_error=False, description="A token from ACTION_METRICS_API_TOKEN(S).")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def unauthorized(detail: str, error: str | None = None) -> HTTPException:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True, slots=True)
class Access:
    """The tokens an app accepts, or `insecure`: everyone may do everything (a laptop only)."""

    tokens: ApiTokens
    insecure: bool = False

    def grant(self, credentials: HTTPAuthorizationCredentials | None, scope: Scope) -> TokenGrant:
        """The grant of the request's token if it may `scope` at all: 401 without a known token, 403
        for a token without the scope. Which towns it may touch is the route's to check."""
        if self.insecure:
            return UNRESTRICTED
        if credentials is None:
            raise unauthorized("send Authorization: Bearer <token>")
        found = self.tokens.grant_for(credentials.credentials)
        if found is None:
            raise unauthorized("the bearer token is not valid", "invalid_token")
        if not found.permits(scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this token may not {scope.value}")
        return found


def _access(request: Request) -> Access:
    access: Access = request.app.state.access
    return access


async def _writer(request: Request, credentials: Credentials) -> TokenGrant:
    return _access(request).grant(credentials, Scope.WRITE)


WriteGrant = Annotated[TokenGrant, Depends(_writer)]
"""A route's parameter: the grant of a token that may write (the app's `state.access` decides)."""
