"""The service's store on a real SQLite file and the local PostgreSQL: migrations to head,
hashed keys with scopes, revocation, usage, a rate window shared by every caller."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from ftservice.store.keys import (
    KeyStoreError,
    authenticate,
    create_key,
    list_keys,
    record_usage,
    revoke_key,
    take_request,
)


def test_keys_are_hashed_scoped_revocable_and_count_usage(store):
    secret = create_key(store, "alice", ["inference", "annotator"], project="team-a")
    assert secret.startswith("fts-") and len(secret) > 40
    with store() as session:
        stored = session.execute(text("SELECT digest, prefix FROM api_keys")).one()
    assert secret not in stored and stored.prefix == secret[:8]  # only the hash is kept
    caller = authenticate(store, secret)
    assert caller.name == "alice" and caller.scopes == {"inference", "annotator"}
    assert caller.project == "team-a"
    assert authenticate(store, secret + "x") is None
    record_usage(store, caller, 11, 7)
    record_usage(store, caller, 1, 2)
    [row] = list_keys(store)
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (2, 12, 9)
    assert secret not in str(row)
    with pytest.raises(KeyStoreError, match="a key named 'alice' exists"):
        create_key(store, "alice", ["inference"])
    with pytest.raises(KeyStoreError, match="scopes root: give one or more of"):
        create_key(store, "bob", ["root"])
    revoke_key(store, "alice")
    assert authenticate(store, secret) is None
    assert list_keys(store)[0]["state"] == "revoked"


def test_the_rate_window_counts_every_request_exactly_once_across_threads(store):
    caller = authenticate(store, create_key(store, "busy", ["inference"]))
    with ThreadPoolExecutor(8) as pool:
        waits = list(pool.map(lambda _: take_request(store, caller, 30), range(40)))
    refused = [w for w in waits if w is not None]
    assert len(refused) == 10  # exactly the 10 past the limit of 30 in this minute
    assert all(0 < w <= 60 for w in refused)


def test_env_keys_are_inference_and_admin(store, monkeypatch):
    monkeypatch.setenv("FTSERVICE_API_KEYS", "one, two")
    caller = authenticate(store, "two")
    assert caller.scopes == {"inference", "admin"} and caller.key_id is None
    assert authenticate(store, "three") is None


def test_keys_cli_shows_a_key_once_and_lists_it_without_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "ftservice", "keys", *args, "--store", url],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done

    made = run("create", "ci", "--scope", "inference", "--scope", "jobs", "--project", "p1")
    secret = made.stdout.strip()
    assert secret.startswith("fts-") and "not shown again" in made.stderr
    listed = run("list").stdout
    assert "ci" in listed and "inference,jobs" in listed and secret not in listed
    run("revoke", "ci")
    assert "revoked" in run("list").stdout


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def test_processes_opening_a_new_store_together_migrate_it_once(backend, tmp_path):
    """The loop's driver and its Serve replicas open a new store at the same moment; each
    must find it migrated, none may fail on a table another one just made."""
    import time
    import uuid

    from conftest import PG
    from sqlalchemy import create_engine

    from ftservice.store.db import open_store

    url, schema = f"sqlite:///{tmp_path / 'state' / 'ftservice.db'}", None
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    if backend == "postgresql":
        url, schema = PG, f"ftservice_test_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
    # a barrier: each process imports, says it is ready, and opens the store once all are
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    opener = (
        "import sys, time, pathlib\n"
        "from ftservice.store.db import open_store\n"
        f"b = pathlib.Path({str(barrier)!r})\n"
        "(b / sys.argv[1]).touch()\n"
        "while not (b / 'go').exists(): time.sleep(0.01)\n"
        f"open_store({url!r}, schema={schema!r})\n"
    )
    try:
        openers = [subprocess.Popen([sys.executable, "-c", opener, str(k)], stderr=subprocess.PIPE,
                                    text=True) for k in range(5)]  # fmt: skip
        try:
            while len(list(barrier.iterdir())) < 5:
                assert all(p.poll() is None for p in openers), "an opener died while importing"
                time.sleep(0.05)
            (barrier / "go").touch()
            errors = [p.communicate(timeout=120)[1] for p in openers]
        finally:
            for p in openers:
                p.kill()
        assert [p.returncode for p in openers] == [0] * 5, "\n".join(errors)[-3000:]
        with open_store(url, schema=schema)() as session:
            versions = session.execute(text("SELECT version_num FROM alembic_version")).all()
            keys = session.execute(text("SELECT count(*) FROM api_keys")).scalar_one()
        assert len(versions) == 1 and keys == 0
    finally:
        if schema:
            with admin.connect() as c:
                c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
