"""Tokens on the archive's HTTP API (archive/auth.py), over real HTTP to the archive service as `poise serve
archive` runs it (`serve("archive")`, a stand-in bus), its tokens read from files like mounted secrets.

Writes need the write token: none or a wrong one is a 401 naming what to send, before the body is read; an
archive started without a write token refuses every write (403). Reads are open, unless a read token is
configured: then the API and the UI need it (or the write token), the UI also as HTTP Basic for browsers. Plus
the settings that read the token files, and `poise secrets`, which writes them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from test_services import RUN, FakeBus, _serve_in_thread, archive_nodes

from app.cli import main as poise
from app.serve import read_token
from archive.client import ArchiveClient
from archive.sqlite_store import SQLiteStore
from poise.contracts import RunConfig
from poise.credentials import ARCHIVE_READ_TOKEN, ARCHIVE_TOKEN, NATS_SERVER_CONF, nats_password_file
from poise.nats_auth import ROLES
from poise.settings import SettingsError, load_settings
from poise.store import ArchiveError

WRITE, READ, OLD = "w" * 20 + "-write", "r" * 20 + "-read", "o" * 20 + "-rotated-out"
RUN_REQUEST = {"run_id": "authorized", "protocol": "tiny", "budget": 1}


@dataclass
class Archive:
    url: str
    work_dir: Path

    def post(self, body: dict | bytes = RUN_REQUEST, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if isinstance(body, bytes):
            return httpx.post(f"{self.url}/api/runs", content=body, headers=headers, timeout=10)
        return httpx.post(f"{self.url}/api/runs", json=body, headers=headers, timeout=10)

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=10)

    def stored_runs(self) -> list[str]:
        with SQLiteStore(self.work_dir / "archive.db", read_only=True) as store:
            return store.run_ids()


def serve_archive(work_dir: Path, **tokens: str) -> Iterator[Archive]:
    """The archive service with its tokens in files (POISE_ARCHIVE_TOKEN_FILE, ...), over a store with one run."""
    work_dir.mkdir()
    store = SQLiteStore(work_dir / "archive.db")
    store.put_run(RunConfig(run_id=RUN, protocol="tiny", budget=4))
    for node in archive_nodes():
        store.insert_node(node)
    store.close()
    files = {}
    for setting, value in tokens.items():
        path = work_dir / setting
        path.write_text(value + "\n")
        files[f"{setting}_file"] = path
    settings = load_settings(work_dir=work_dir, http_port=0, http_host="127.0.0.1", **files)
    stop, thread, result, url = _serve_in_thread("archive", settings, FakeBus())
    yield Archive(url, work_dir)
    stop.set()
    thread.join(10)
    assert result == [0]


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """Writes need WRITE (or OLD, a token being rotated out); reads are open."""
    yield from serve_archive(tmp_path / "open", archive_token=f"{WRITE}\n{OLD}")


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Archive]:
    """Writes need WRITE, reads READ (or WRITE)."""
    yield from serve_archive(tmp_path / "private", archive_token=WRITE, archive_read_token=READ)


def assert_unauthorized(response: httpx.Response, scheme: str = "Bearer", problem: str = "no token was sent") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == f'{scheme} realm="poise"'
    detail = response.json()["detail"]
    assert problem in detail and "docs/operations.md" in detail, detail


# ----------------------------------------------------------------------------------------------- writes


def test_a_write_without_the_token_or_with_a_wrong_one_is_a_401_and_starts_nothing(archive: Archive):
    assert_unauthorized(archive.post())
    assert_unauthorized(archive.post(token=WRITE[:-1] + "X"), problem="the token sent is not valid")
    assert_unauthorized(archive.post(token=READ), problem="the token sent is not valid")
    basic = httpx.post(f"{archive.url}/api/runs", json=RUN_REQUEST, auth=("poise", WRITE[::-1]), timeout=10)
    assert_unauthorized(basic, problem="the token sent is not valid")
    # answered before the body is read: an unauthenticated client learns nothing of what the archive accepts
    assert_unauthorized(archive.post(b'{"run_id": '))
    assert_unauthorized(archive.post({"run_id": RUN, "budget": 0}))
    assert archive.stored_runs() == [RUN]


def test_a_write_with_the_token_starts_the_run_and_either_of_two_rotating_tokens_works(archive: Archive):
    assert archive.post(token=WRITE).status_code == 202
    assert archive.post({**RUN_REQUEST, "run_id": "with-the-old-one"}, token=OLD).status_code == 202
    assert sorted(archive.stored_runs()) == sorted([RUN, "authorized", "with-the-old-one"])
    # with the token, the body is judged as before
    assert archive.post(b'{"run_id": ', token=WRITE).status_code == 422


def test_an_archive_started_without_a_write_token_refuses_every_write_and_says_how_to_configure_one(tmp_path):
    for archive in serve_archive(tmp_path / "no-token"):
        for token in (None, WRITE):
            refused = archive.post(token=token)
            assert refused.status_code == 403, refused.text
            assert "POISE_ARCHIVE_TOKEN_FILE" in refused.json()["detail"]
        assert archive.stored_runs() == [RUN]
        assert archive.get("/api/runs").status_code == 200  # reads stay open


# ------------------------------------------------------------------------------------------------ reads


def test_reads_are_open_without_a_read_token_but_health_and_metrics_always_are(archive: Archive, private: Archive):
    assert [run["run_id"] for run in archive.get("/api/runs").json()] == [RUN]
    assert archive.get(f"/runs/{RUN}").status_code == 200
    for open_path in ("/healthz", "/metrics", "/api/openapi.json"):
        assert private.get(open_path).status_code == 200, open_path


def test_with_a_read_token_the_api_needs_it_or_the_write_token(private: Archive):
    for path in ("/api/runs", f"/api/runs/{RUN}", f"/api/runs/{RUN}/nodes/n000"):
        assert_unauthorized(private.get(path))
        assert_unauthorized(private.get(path, Authorization=f"Bearer {READ[::-1]}"), problem="not valid")
        assert private.get(path, Authorization=f"Bearer {READ}").status_code == 200, path
        assert private.get(path, Authorization=f"Bearer {WRITE}").status_code == 200, path
    assert_unauthorized(private.post(token=READ), problem="not valid")  # the read token does not write


def test_with_a_read_token_the_ui_asks_a_browser_for_it_with_http_basic(private: Archive):
    for path in ("/", f"/runs/{RUN}", f"/runs/{RUN}/tree"):
        assert_unauthorized(private.get(path), scheme="Basic")
        assert httpx.get(f"{private.url}{path}", auth=("anyone", READ), timeout=10).status_code == 200, path
    assert httpx.get(f"{private.url}/", auth=("anyone", "wrong-token-wrong"), timeout=10).status_code == 401


def test_the_archive_client_sends_the_read_token_and_names_the_setting_when_refused(private: Archive):
    reader = ArchiveClient(private.url, token=READ, retries=0)
    assert reader.run_ids() == [RUN] and reader.get_node(RUN, "n000").node_id == "n000"
    reader.close()
    stranger = ArchiveClient(private.url, retries=0)
    with pytest.raises(ArchiveError, match="refused a read without a token .*POISE_ARCHIVE_READ_TOKEN_FILE"):
        stranger.run_ids()
    stranger.close()


# -------------------------------------------------------------------------------------------- settings


def test_a_token_comes_from_its_file_or_its_variable_never_both(tmp_path: Path, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("POISE_")]:
        monkeypatch.delenv(variable)
    token_file = tmp_path / "token"
    token_file.write_text(f"  {READ}\n")
    monkeypatch.setenv("POISE_ARCHIVE_READ_TOKEN_FILE", str(token_file))
    settings = load_settings()
    assert read_token(settings) == READ and READ not in repr(settings)  # a secret is never printed
    monkeypatch.setenv("POISE_ARCHIVE_READ_TOKEN", READ)
    with pytest.raises(SettingsError, match="POISE_ARCHIVE_READ_TOKEN and POISE_ARCHIVE_READ_TOKEN_FILE are both"):
        load_settings()
    monkeypatch.delenv("POISE_ARCHIVE_READ_TOKEN")
    monkeypatch.setenv("POISE_ARCHIVE_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.setenv("POISE_NATS_PASSWORD_FILE", str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert f"POISE_ARCHIVE_TOKEN_FILE={tmp_path / 'missing'}: cannot read it" in str(refused.value)
    assert f"POISE_NATS_PASSWORD_FILE={tmp_path / 'empty'}: the file is empty" in str(refused.value)


def test_a_short_token_is_refused(monkeypatch):
    monkeypatch.setenv("POISE_ARCHIVE_TOKEN", "secret")
    with pytest.raises(SettingsError, match="POISE_ARCHIVE_TOKEN: a token of fewer than 16 characters"):
        load_settings()


def test_nats_credentials_default_to_the_service_user(monkeypatch):
    for variable in [v for v in os.environ if v.startswith("POISE_")]:
        monkeypatch.delenv(variable)
    assert load_settings().nats_credentials("trainer") == (None, None)
    monkeypatch.setenv("POISE_NATS_PASSWORD", "pw")
    assert load_settings().nats_credentials("trainer") == ("poise-trainer", "pw")
    monkeypatch.setenv("POISE_NATS_USER", "trainer-b")
    assert load_settings().nats_credentials("trainer") == ("trainer-b", "pw")


# ------------------------------------------------------------------------------------------ poise secrets


def test_poise_secrets_writes_every_credential_privately_keeps_them_and_rotates_on_request(tmp_path: Path, capsys):
    directory = tmp_path / "secrets"
    assert poise(["secrets", str(directory)]) == 0
    names = {ARCHIVE_TOKEN, ARCHIVE_READ_TOKEN, NATS_SERVER_CONF, nats_password_file("admin"),
             *(nats_password_file(service) for service in ROLES)}
    assert {path.name for path in directory.iterdir()} == names
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    values = {name: (directory / name).read_text() for name in names}
    assert len({values[name] for name in names if name != NATS_SERVER_CONF}) == len(names) - 1  # all different
    assert all(len(value.strip()) >= 40 for name, value in values.items() if name != NATS_SERVER_CONF)
    config = values[NATS_SERVER_CONF]
    for service in ROLES:
        assert values[nats_password_file(service)].strip() in config
    assert poise(["secrets", str(directory)]) == 0  # again: the same secrets
    assert {name: (directory / name).read_text() for name in names} == values
    assert poise(["secrets", str(directory), "--rotate"]) == 0
    assert (directory / ARCHIVE_TOKEN).read_text() != values[ARCHIVE_TOKEN]
    assert "wrote" in capsys.readouterr().out
