"""Who may use the archive's HTTP API: a bearer token to write, and to read when a read token is configured.

`POST /api/runs` spends GPU-hours and LLM money, so it needs the write token (POISE_ARCHIVE_TOKEN_FILE or
POISE_ARCHIVE_TOKEN, poise/settings.py). An archive served without one refuses every write with a 403 that
says how to configure one: nothing a client sends can start a run there (POISE_RUN_ID still starts one at
start-up). Reads (the API and the web UI) are open unless a read token is configured; the write token reads
too. Each setting may hold several tokens, one per line, so a token can be rotated without a window in which
clients are locked out.

Clients send `Authorization: Bearer <token>`. The UI's pages also take HTTP Basic with the token as the
password (any user name), so a browser asks for it itself. Tokens are compared in constant time, against every
configured token. A missing or wrong token is a 401 with `WWW-Authenticate` and a JSON `detail` naming what to
send; /healthz and /metrics stay open (probes and Prometheus; docs/operations.md, "Authentication").
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPBearer

REALM = "poise"
SETTING_HINT = ("docs/operations.md, \"Authentication\"; `poise secrets` makes the token files")
# declares the scheme in the OpenAPI document (the Authorize button of /api/docs); the check is ApiAuth's
BEARER = HTTPBearer(auto_error=False, scheme_name="archive token",
                    description="the archive's write token (POST /api/runs), or its read token where reads need one")


def tokens_of(text: str | None) -> tuple[str, ...]:
    """The tokens a setting holds: one per line, blank lines ignored."""
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


class ApiAuth:
    """The tokens that let a request write (`write_tokens`) and read (`read_tokens`, none: reads are open)."""

    def __init__(self, write_tokens: Iterable[str] = (), read_tokens: Iterable[str] = ()) -> None:
        self.write_tokens = tuple(token.encode() for token in write_tokens)
        self.read_tokens = tuple(token.encode() for token in read_tokens)

    @property
    def writes(self) -> bool:
        return bool(self.write_tokens)

    @property
    def open_reads(self) -> bool:
        return not self.read_tokens

    def describe(self) -> str:
        """One line for the archive's start-up log."""
        writes = ("writes need the write token (POISE_ARCHIVE_TOKEN_FILE)" if self.writes else
                  "writes are refused: no write token is configured (POISE_ARCHIVE_TOKEN_FILE)")
        reads = "reads are open" if self.open_reads else "reads need the read or write token"
        return f"archive API: {writes}; {reads}"

    # ------------------------------------------------------------------------------------------ checks

    def check_write(self, request: Request) -> None:
        """Raise the HTTP answer to a write without the write token."""
        if not self.writes:
            raise HTTPException(403, detail="this archive accepts no writes: it was started without a write token; "
                                            "start it with POISE_ARCHIVE_TOKEN_FILE (or POISE_ARCHIVE_TOKEN) set, "
                                            f"then send it as 'Authorization: Bearer <token>' ({SETTING_HINT})")
        if not _matches(presented(request), self.write_tokens):
            raise _unauthorized(request, "writing to the archive needs its write token", "Bearer")

    def check_read(self, request: Request) -> None:
        if not self.open_reads and not _matches(presented(request), self.read_tokens + self.write_tokens):
            raise _unauthorized(request, "reading this archive needs its read token", "Bearer")

    def read(self, request: Request, _bearer: object = Security(BEARER)) -> None:
        """Dependency of the API's routes."""
        self.check_read(request)

    def read_page(self, request: Request) -> None:
        """Dependency of the UI's routes: a browser is asked for the token (HTTP Basic, the token as password)."""
        if not self.open_reads and not _matches(presented(request), self.read_tokens + self.write_tokens):
            raise _unauthorized(request, "reading this archive needs its read token", "Basic")


def presented(request: Request) -> bytes | None:
    """The token a request carries: `Bearer <token>`, or the password of HTTP Basic."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value.encode()
    if scheme.lower() == "basic" and value:
        try:
            _, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password.encode() or None
    return None


def _matches(given: bytes | None, tokens: tuple[bytes, ...]) -> bool:
    """Whether `given` is one of `tokens`; every token is compared, each in constant time."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given or b"", token)
    return found and given is not None


def _unauthorized(request: Request, what: str, scheme: str) -> HTTPException:
    problem = "the token sent is not valid" if presented(request) is not None else "no token was sent"
    how = ("send 'Authorization: Bearer <token>'" if scheme == "Bearer"
           else "enter the token as the password (any user name)")
    return HTTPException(401, detail=f"{what}: {problem}; {how} ({SETTING_HINT})",
                         headers={"WWW-Authenticate": f'{scheme} realm="{REALM}"'})
