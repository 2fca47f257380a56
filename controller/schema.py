"""The job database's schema: the tables, and the migrations that take any older database to it.

The database is versioned: `schema_version` holds the version, and `MIGRATIONS[i]` takes a
database from version i to i + 1, each in one transaction. Append a migration for every
change; never edit a released one. A database newer than this code is refused
(`SchemaVersionError`) rather than guessed at.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from .states import StoreError

logger = logging.getLogger(__name__)


class SchemaVersionError(StoreError):
    """The database was written by a newer pathways_lite than this one."""


# The states as released migrations 0 and 1 wrote them, spelled out: built from the enums, a
# state added later would have changed them for new databases only (old ones refusing it).
# A new state needs a migration that rebuilds its table (tests/test_store.py checks these
# against the enums).
_STATES_SQL = "'queued', 'running', 'suspended', 'succeeded', 'failed', 'cancelled'"
_CHECKPOINT_STATES_SQL = "'committed', 'corrupt', 'deleted'"

# MIGRATIONS[i] takes the schema from version i to i + 1. Append; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE controller (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
        f"""CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
            priority INTEGER NOT NULL,
            weight REAL NOT NULL,
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            started_us INTEGER,
            finished_us INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            message TEXT NOT NULL DEFAULT '',
            generation INTEGER NOT NULL DEFAULT 0,
            request_id TEXT UNIQUE
        )""",
        "CREATE UNIQUE INDEX jobs_by_created ON jobs (created_us, id)",
        "CREATE INDEX jobs_by_state ON jobs (state, priority DESC, created_us, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            time_us INTEGER NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        )""",
        "CREATE INDEX events_by_job ON events (job_id, id)",
        """CREATE TABLE metrics (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            step INTEGER NOT NULL CHECK (step >= 0),
            loss REAL NOT NULL,
            tokens_per_s REAL NOT NULL,
            step_time_s REAL NOT NULL,
            time_us INTEGER NOT NULL,
            PRIMARY KEY (job_id, step)
        )""",
    ),
    # 1 -> 2: the checkpoint registry and the retry budgets of failure classes (issue 8).
    (
        f"""CREATE TABLE checkpoints (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            generation INTEGER NOT NULL CHECK (generation >= 0),
            step INTEGER NOT NULL CHECK (step >= 0),
            path TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_CHECKPOINT_STATES_SQL})),
            created_us INTEGER NOT NULL,
            updated_us INTEGER NOT NULL,
            PRIMARY KEY (job_id, generation, step)
        )""",
        "CREATE INDEX checkpoints_by_job ON checkpoints (job_id, state, step)",
        """CREATE TABLE retries (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            failure_class TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (job_id, failure_class)
        )""",
    ),
    # 2 -> 3: each step's MFU, stored with it (NULL for steps recorded before: computed on
    # read from the job's spec).
    ("ALTER TABLE metrics ADD COLUMN mfu REAL",),
    # 3 -> 4: a mixture step's per-source loss and target tokens, as JSON
    # {"loss": {source: mean}, "tokens": {source: count}, "stats": the global (sum, count)
    # vector} (NULL for other jobs).
    ("ALTER TABLE metrics ADD COLUMN sources TEXT",),
    # 4 -> 5: evaluations, per source (issue 17); exact_match and token_f1 NULL for
    # language-model sources.
    (
        """CREATE TABLE evals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            step INTEGER NOT NULL CHECK (step >= 0),
            shots INTEGER NOT NULL,
            source TEXT NOT NULL,
            loss REAL NOT NULL,
            perplexity REAL NOT NULL,
            exact_match REAL,
            token_f1 REAL,
            examples INTEGER NOT NULL,
            time_us INTEGER NOT NULL
        )""",
        "CREATE INDEX evals_by_job ON evals (job_id, id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> tuple[int, int]:
    """Bring a database to the newest schema, one transaction per migration.

    Args:
        conn: a connection in autocommit mode (isolation_level=None).
        migrations: migrations[i] holds the statements from version i to i + 1.

    Returns:
        (version before, version after).

    Raises:
        SchemaVersionError: the database is newer than the migrations know.
    """
    before = schema_version(conn)
    if before > len(migrations):
        raise SchemaVersionError(
            f"the job database has schema version {before}, newer than this pathways_lite's "
            f"{len(migrations)}; upgrade pathways_lite or use another --state-dir."
        )
    for version in range(before, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        if schema_version(conn) > version:  # another process (a tool) migrated it meanwhile
            conn.execute("ROLLBACK")
            continue
        try:
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        logger.info("job database migrated to schema version %d", version + 1)
    return before, len(migrations)
