"""The secrets of a distributed POISE, made by `poise secrets DIR` (docs/operations.md, "Authentication").

One directory holds everything compose and k8s mount, one value per file:

    archive-token            the archive API's write token (POST /api/runs): the archive and whoever starts runs
    archive-read-token       the read token: mounted into the archive and the services that read its API
                             (proposer, implementer, reflector), and used only where POISE_ARCHIVE_READ_TOKEN_FILE
                             names it (reads stay open otherwise)
    nats-<service>.password  each service's NATS password (its user is poise-<service>, poise/nats_auth.py)
    nats-admin.password      the unlimited NATS user, for an operator's `nats` CLI; mounted nowhere
    nats-server.conf         the NATS users and their permissions (holds every NATS password)

Values are random (256 bits, URL-safe). A file that exists is kept, so running the command again changes
nothing but nats-server.conf, which is always written anew from the password files (new permissions in
poise/nats_auth.py reach the server that way); `rotate` makes new values. The directory is private to its
owner (0700); the files in it are 0644, because docker compose bind-mounts them as they are into containers
whose user is not the owner, and the directory already keeps other users of the host out.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from poise.nats_auth import ADMIN_USER, ROLES, server_config

ARCHIVE_TOKEN = "archive-token"
ARCHIVE_READ_TOKEN = "archive-read-token"
NATS_SERVER_CONF = "nats-server.conf"
MIN_TOKEN_CHARS = 16
ARCHIVE_READERS = ("proposer", "implementer", "reflector")  # the services that read the archive's API (app/serve.py)


class CredentialError(ValueError):
    """A secret that cannot be read or is not fit to use; the message names the setting or file."""


def nats_password_file(service: str) -> str:
    """The file of `service`'s NATS password (`admin`: the admin user's)."""
    return f"nats-{service}.password"


def files_of(service: str) -> dict[str, str]:
    """The secret files `service` is given, by the setting that names each: what compose, k8s and app/cluster.py
    mount for it, and nothing more (the read token's setting is left empty where reads are open)."""
    files = {"POISE_NATS_PASSWORD_FILE": nats_password_file(service)}
    if service == "archive":
        files["POISE_ARCHIVE_TOKEN_FILE"] = ARCHIVE_TOKEN
    if service in ("archive", *ARCHIVE_READERS):
        files["POISE_ARCHIVE_READ_TOKEN_FILE"] = ARCHIVE_READ_TOKEN
    return files


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def read_secret(path: Path, setting: str) -> str:
    """The secret in `path` (surrounding whitespace removed), or CredentialError naming `setting`."""
    try:
        value = Path(path).read_text().strip()
    except OSError as err:
        raise CredentialError(f"{setting}={path}: cannot read it ({err.strerror or err})") from None
    if not value:
        raise CredentialError(f"{setting}={path}: the file is empty")
    return value


def write_secrets(directory: Path, *, rotate: bool = False) -> list[Path]:
    """Write the missing secrets into `directory` (all of them with `rotate`), then nats-server.conf; returns the
    files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    names = [ARCHIVE_TOKEN, ARCHIVE_READ_TOKEN, *(nats_password_file(service) for service in (*ROLES, "admin"))]
    written = []
    for name in names:
        path = directory / name
        if rotate or not path.exists():
            _write(path, new_secret() + "\n")
            written.append(path)
    passwords = {service: read_secret(directory / nats_password_file(service), nats_password_file(service))
                 for service in ROLES}
    passwords[ADMIN_USER] = read_secret(directory / nats_password_file("admin"), nats_password_file("admin"))
    _write(directory / NATS_SERVER_CONF, server_config(passwords))
    written.append(directory / NATS_SERVER_CONF)
    return written


def _write(path: Path, text: str) -> None:
    """Write `text` to `path` through a new file, so no reader ever sees half a secret."""
    fresh = path.with_name(f".{path.name}.new")
    fresh.unlink(missing_ok=True)
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(fresh, 0o644)  # not narrowed by the umask: see the module docstring
    fresh.replace(path)
