"""The PostgreSQL URLs a managed provider hands out, libpq parameters and all, work as written; a
parameter action-metrics does not know is refused in one line before any connection is tried."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import POSTGRES_ADMIN_URL, Databases, assert_one_line_error, metric, run_cli
from sqlalchemy import make_url

from action_metrics import DatabaseUnavailable, MetricsStore, UnsupportedDatabase, migrate
from action_metrics.dialects import backend_for, display_url

PROVIDER_PARAMETERS = "sslmode=disable&connect_timeout=5&application_name=am_test"
"""What a provider's connection string carries, with TLS off: the test server has none."""


def with_parameters(url: str, parameters: str) -> str:
    return f"{url}?{parameters}"


async def _admin_fetch(statement: str, *arguments: object) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        return await connection.fetch(statement, *arguments)
    finally:
        await connection.close()


def admin_fetch(statement: str, *arguments: object) -> list[asyncpg.Record]:
    return asyncio.run(_admin_fetch(statement, *arguments))


@pytest.fixture
def postgres(backend: Databases) -> Databases:
    if backend.name != "postgresql":
        pytest.skip("libpq parameters are PostgreSQL's")
    return backend


@pytest.fixture
def migrated_url(postgres: Databases) -> Iterator[str]:
    url = postgres.migrated()
    yield url
    postgres.drop(url)


@pytest.fixture
def server_without_tls(postgres: Databases) -> None:
    if admin_fetch("SHOW ssl")[0][0] != "off":
        pytest.skip("the test server offers TLS: a URL requiring it would connect")


def test_a_provider_url_stores_and_aggregates_and_the_server_sees_the_application_name(
    migrated_url: str,
) -> None:
    database = make_url(migrated_url).database
    with MetricsStore(with_parameters(migrated_url, PROVIDER_PARAMETERS)) as store:
        store.emit_many([metric(), metric(action_type="lod4")])
        assert store.aggregate().count == 2
        # The store's pooled connection is still open: the server knows it by the URL's name.
        sessions = admin_fetch("SELECT application_name FROM pg_stat_activity WHERE datname = $1", database)
        assert {session["application_name"] for session in sessions} == {"am_test"}


def test_db_upgrade_and_current_take_a_provider_url(empty_database_url: str, postgres: Databases) -> None:
    url = with_parameters(empty_database_url, PROVIDER_PARAMETERS)
    upgraded = run_cli("db", "upgrade", "--url", url)
    assert upgraded.exit_code == 0, upgraded.output
    current = run_cli("db", "current", "--url", url)
    assert current.exit_code == 0, current.output
    assert current.stdout.strip() == f"{migrate.head_revision()} (head)"


def test_requiring_tls_of_a_server_without_it_is_a_connection_error(
    migrated_url: str, server_without_tls: None
) -> None:
    url = with_parameters(migrated_url, "sslmode=require")
    with pytest.raises(DatabaseUnavailable, match="rejected SSL upgrade"), MetricsStore(url) as store:
        store.aggregate()
    assert_one_line_error(run_cli("db", "upgrade", "--url", url), 1, "rejected SSL upgrade")


def test_connect_timeout_bounds_the_wait_for_a_server_that_never_answers() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with (
            pytest.raises(DatabaseUnavailable, match=r"TimeoutError: no answer within .*connect_timeout"),
            MetricsStore(f"postgresql://app@127.0.0.1:{port}/metrics?connect_timeout=1") as store,
        ):
            store.aggregate()
    assert time.monotonic() - started < 30  # asyncpg's own default is 60 s


def test_an_unknown_parameter_is_refused_in_one_line_before_connecting() -> None:
    url = "postgresql://app:secret@db.invalid/metrics?sslmode=require&frobnicate=1"
    with pytest.raises(UnsupportedDatabase) as refused:
        MetricsStore(url)
    message = str(refused.value)
    assert "\n" not in message
    assert "URL parameter frobnicate;" in message
    assert "sslmode, ssl, connect_timeout, application_name" in message
    assert "secret" not in message

    assert_one_line_error(run_cli("db", "current", "--url", url), 1, "URL parameter frobnicate;")


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ("sslmode=required", "sslmode 'required' is not one of disable, allow, prefer, require"),
        ("ssl=true", "ssl 'true' is not one of"),
        ("sslmode=require&ssl=disable", "sslmode and ssl differ"),
        ("connect_timeout=5s", "connect_timeout is whole seconds"),
        ("sslrootcert=/no/such/root.crt", "sslrootcert names no file here, '/no/such/root.crt'"),
    ],
)
def test_unusable_values_are_refused_before_connecting(parameters: str, fragment: str) -> None:
    with pytest.raises(UnsupportedDatabase, match=fragment):
        backend_for(f"postgresql://app@db.invalid/metrics?{parameters}")


def test_libpq_parameters_become_asyncpg_arguments(tmp_path: Path) -> None:
    root = tmp_path / "root.crt"
    root.write_text("")
    backend = backend_for(
        f"postgresql://app@db.example/metrics?sslmode=verify-full&sslrootcert={root}&connect_timeout=0"
        "&application_name=dashboard&options=-cstatement_timeout%3D5000&target_session_attrs=read-write"
    )
    assert backend.engine_options()["connect_args"] == {
        "server_settings": {"jit": "off", "statement_timeout": "5000", "application_name": "dashboard"},
        "ssl": "verify-full",
        "timeout": None,  # libpq: 0 waits as long as it takes
        # asyncpg reads the certificate files only from a connection string.
        "dsn": f"postgresql://?sslrootcert={str(root).replace('/', '%2F')}",
    }
    # asyncpg's own keyword arguments stay in the URL, which SQLAlchemy hands over as they are.
    assert dict(backend.url.query) == {"target_session_attrs": "read-write"}


def test_the_root_certificate_named_is_the_one_asyncpg_loads(migrated_url: str, tmp_path: Path) -> None:
    not_a_certificate = tmp_path / "root.crt"
    not_a_certificate.write_text("not a certificate\n")
    url = with_parameters(migrated_url, f"sslmode=verify-full&sslrootcert={not_a_certificate}")
    with pytest.raises(DatabaseUnavailable, match="NO_CERTIFICATE_OR_CRL_FOUND"), MetricsStore(url) as store:
        store.aggregate()


def test_the_ssl_key_password_is_hidden_as_the_password_is() -> None:
    url = make_url("postgresql://app:secret@db.example/metrics?sslpassword=keysecret&sslmode=require")
    shown = display_url(url)
    assert "secret" not in shown
    assert shown == "postgresql://app:***@db.example/metrics?sslmode=require&sslpassword=***"
    # libpq also reads a password from the query; refused here, but never shown in the refusal.
    with pytest.raises(UnsupportedDatabase, match=r"URL parameter password;") as refused:
        backend_for("postgresql://app@db.example/metrics?password=querysecret")
    assert "querysecret" not in str(refused.value)
