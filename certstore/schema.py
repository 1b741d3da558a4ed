"""Versioned schema. Each migration moves `PRAGMA user_version` up by one.

Append new migrations; never edit a released one.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    CREATE TABLE domains (
        hostname TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        state TEXT NOT NULL,
        cname_target_seen TEXT,
        verified_at REAL,
        last_check_at REAL,
        last_check_reason TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE acme_accounts (
        directory_url TEXT PRIMARY KEY,
        uri TEXT NOT NULL,
        key_sealed BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE certificates (
        hostname TEXT PRIMARY KEY,
        chain_pem BLOB NOT NULL,
        key_sealed BLOB NOT NULL,
        names TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issuer TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE challenges (
        token TEXT PRIMARY KEY,
        key_authorization TEXT NOT NULL,
        hostname TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        hostname TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_by_host ON events (hostname, id);
    """,
    # 2: renewal, limits and TLS-ALPN-01 (issue 5)
    """
    ALTER TABLE certificates ADD COLUMN serial TEXT NOT NULL DEFAULT '';
    ALTER TABLE certificates ADD COLUMN directory_url TEXT NOT NULL DEFAULT '';
    CREATE TABLE renewals (
        hostname TEXT PRIMARY KEY,
        due_at REAL NOT NULL,
        next_check_at REAL NOT NULL,
        source TEXT NOT NULL,
        last_error TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX renewals_by_next_check ON renewals (next_check_at);
    CREATE TABLE rate_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX rate_log_by_bucket ON rate_log (bucket, at);
    CREATE TABLE host_backoff (
        hostname TEXT PRIMARY KEY,
        failures INTEGER NOT NULL,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE alpn_challenges (
        hostname TEXT PRIMARY KEY,
        key_authorization TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 3: lifecycle (reasons, schedule, last check report), transition events, host options
    """
    ALTER TABLE domains ADD COLUMN state_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE domains ADD COLUMN state_changed_at REAL;
    ALTER TABLE domains ADD COLUMN next_check_at REAL;
    ALTER TABLE domains ADD COLUMN failed_checks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE domains ADD COLUMN last_report TEXT;
    UPDATE domains SET state_changed_at = created_at;
    UPDATE domains SET next_check_at = 0 WHERE state != 'suspended';
    ALTER TABLE events ADD COLUMN from_state TEXT;
    ALTER TABLE events ADD COLUMN to_state TEXT;
    CREATE INDEX domains_due ON domains (next_check_at) WHERE next_check_at IS NOT NULL;
    CREATE INDEX domains_by_account ON domains (account, hostname);
    CREATE INDEX domains_by_state ON domains (state, hostname);
    CREATE TABLE host_options (
        hostname TEXT PRIMARY KEY,
        options TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    -- Every state change is an event, whichever code path (or process) made it.
    CREATE TRIGGER domain_state_event AFTER UPDATE OF state ON domains
    WHEN old.state IS NOT new.state
    BEGIN
        INSERT INTO events (at, hostname, kind, detail, from_state, to_state)
        VALUES (COALESCE(new.state_changed_at, 0), new.hostname, 'state',
                new.state_reason, old.state, new.state);
    END;
    """,
    # 4: files served per host (app association files); writes are events, atomically,
    # so every worker's cache of them (and of the options) is invalidated
    """
    CREATE TABLE host_files (
        hostname TEXT NOT NULL,
        kind TEXT NOT NULL,
        content BLOB NOT NULL,
        etag TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (hostname, kind)
    );
    CREATE TRIGGER host_file_inserted AFTER INSERT ON host_files
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (new.updated_at, new.hostname, 'file_updated',
                new.kind || ': ' || length(new.content) || ' bytes, ETag ' || new.etag);
    END;
    CREATE TRIGGER host_file_updated AFTER UPDATE ON host_files
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (new.updated_at, new.hostname, 'file_updated',
                new.kind || ': ' || length(new.content) || ' bytes, ETag ' || new.etag);
    END;
    -- a deleted row carries no time of deletion: SQLite's clock stands in for the store's
    CREATE TRIGGER host_file_deleted AFTER DELETE ON host_files
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES ((julianday('now') - 2440587.5) * 86400.0, old.hostname, 'file_deleted',
                old.kind);
    END;
    CREATE TRIGGER host_options_inserted AFTER INSERT ON host_options
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (new.updated_at, new.hostname, 'options_changed', new.options);
    END;
    CREATE TRIGGER host_options_updated AFTER UPDATE ON host_options
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (new.updated_at, new.hostname, 'options_changed', new.options);
    END;
    """,
    # 5: crash safety and CA outages (issue 8): lease holders' node and pid (a restarted
    # process frees the leases of its dead predecessors at once), orders in flight (the
    # process that takes over resumes the order instead of placing a second one), and
    # one circuit-breaker row per CA directory, shared by the workers
    """
    ALTER TABLE leases ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE leases ADD COLUMN pid INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE pending_orders (
        hostname TEXT PRIMARY KEY,
        directory_url TEXT NOT NULL,
        order_url TEXT NOT NULL,
        account_uri TEXT NOT NULL,
        key_sealed BLOB NOT NULL,
        names TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    -- the certificate of an order and the end of that order are one statement
    CREATE TRIGGER certificate_inserted_ends_order AFTER INSERT ON certificates
    BEGIN
        DELETE FROM pending_orders WHERE hostname = new.hostname;
    END;
    CREATE TRIGGER certificate_updated_ends_order AFTER UPDATE ON certificates
    BEGIN
        DELETE FROM pending_orders WHERE hostname = new.hostname;
    END;
    CREATE TABLE ca_breakers (
        directory_url TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        failures INTEGER NOT NULL,
        opened_at REAL,
        next_probe_at REAL,
        last_error TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 6: the storage contract (issue 10): registering and removing a host emit their
    # events in the same statement as the change, and removal takes everything of the
    # host with it, so no reader sees one without the other
    """
    CREATE TRIGGER domain_registered_event AFTER INSERT ON domains
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (new.created_at, new.hostname, 'registered', 'account ' || new.account);
    END;
    CREATE TRIGGER domain_removed AFTER DELETE ON domains
    BEGIN
        DELETE FROM certificates WHERE hostname = old.hostname;
        DELETE FROM challenges WHERE hostname = old.hostname;
        DELETE FROM renewals WHERE hostname = old.hostname;
        DELETE FROM host_backoff WHERE hostname = old.hostname;
        DELETE FROM alpn_challenges WHERE hostname = old.hostname;
        DELETE FROM host_options WHERE hostname = old.hostname;
        DELETE FROM host_files WHERE hostname = old.hostname;
        INSERT INTO events (at, hostname, kind, detail)
        VALUES ((julianday('now') - 2440587.5) * 86400.0, old.hostname, 'removed',
                'domain and its certificate deleted');
    END;
    """,
    # 7: a million hosts (issue 11): what runs at start and on timers reads an index, not
    # every certificate. Certificates without a renewal plan wait in a queue the triggers
    # keep (the maintenance loop's "no plan yet" was an anti-join over all certificates);
    # plans by due time (the gauges; leveling counts plans per slot); certificates by
    # expiry (the gauges, the soonest expiries); failing plans (a small partial index).
    # (No OR IGNORE in a trigger: the firing statement's conflict clause would override it.)
    """
    CREATE INDEX renewals_by_due ON renewals (due_at);
    CREATE INDEX renewals_failing ON renewals (hostname)
        WHERE last_error IS NOT NULL AND last_error != '';
    CREATE INDEX certificates_by_expiry ON certificates (not_after);
    CREATE TABLE unplanned_certificates (hostname TEXT PRIMARY KEY);
    INSERT INTO unplanned_certificates (hostname) SELECT hostname FROM certificates
        WHERE hostname NOT IN (SELECT hostname FROM renewals);
    CREATE TRIGGER certificate_inserted_unplanned AFTER INSERT ON certificates
    BEGIN
        INSERT INTO unplanned_certificates (hostname) SELECT new.hostname WHERE NOT EXISTS
            (SELECT 1 FROM unplanned_certificates WHERE hostname = new.hostname);
    END;
    CREATE TRIGGER certificate_updated_unplanned AFTER UPDATE ON certificates
    BEGIN
        INSERT INTO unplanned_certificates (hostname) SELECT new.hostname WHERE NOT EXISTS
            (SELECT 1 FROM unplanned_certificates WHERE hostname = new.hostname);
    END;
    CREATE TRIGGER certificate_deleted_unplanned AFTER DELETE ON certificates
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname = old.hostname;
    END;
    CREATE TRIGGER renewal_planned AFTER INSERT ON renewals
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname = new.hostname;
    END;
    CREATE TRIGGER renewal_replanned AFTER UPDATE ON renewals
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname = new.hostname;
    END;
    """,
    # 8: host counts per state kept by triggers (issue 11): the gauges' GROUP BY over a
    # million hosts held a worker's only store connection (and every handshake queued
    # behind it) for a third of a second per scrape
    """
    CREATE TABLE domain_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
    INSERT INTO domain_counts (state, n) SELECT state, COUNT(*) FROM domains GROUP BY state;
    CREATE TRIGGER domain_counted AFTER INSERT ON domains
    BEGIN
        INSERT INTO domain_counts (state, n) SELECT new.state, 0 WHERE NOT EXISTS
            (SELECT 1 FROM domain_counts WHERE state = new.state);
        UPDATE domain_counts SET n = n + 1 WHERE state = new.state;
    END;
    CREATE TRIGGER domain_uncounted AFTER DELETE ON domains
    BEGIN
        UPDATE domain_counts SET n = n - 1 WHERE state = old.state;
    END;
    CREATE TRIGGER domain_recounted AFTER UPDATE OF state ON domains
    WHEN old.state IS NOT new.state
    BEGIN
        INSERT INTO domain_counts (state, n) SELECT new.state, 0 WHERE NOT EXISTS
            (SELECT 1 FROM domain_counts WHERE state = new.state);
        UPDATE domain_counts SET n = n - 1 WHERE state = old.state;
        UPDATE domain_counts SET n = n + 1 WHERE state = new.state;
    END;
    """,
    # 9: plans per 3-hour slot of due time kept by triggers (issue 11): the leveling
    # scheduler reads the load over weeks of slots once a minute per worker; counting a
    # million plans for it held the worker's only store connection for 0.15-2 s. The
    # grid is RENEWAL_SLOT_SECONDS from the epoch (the scheduler's own grid).
    """
    CREATE TABLE renewal_slots (slot INTEGER PRIMARY KEY, n INTEGER NOT NULL);
    INSERT INTO renewal_slots (slot, n)
        SELECT CAST(due_at / 10800 AS INTEGER) - (due_at < 0), COUNT(*) FROM renewals
        GROUP BY 1;
    CREATE TRIGGER renewal_slot_added AFTER INSERT ON renewals
    BEGIN
        INSERT INTO renewal_slots (slot, n)
            SELECT CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0), 0 WHERE NOT EXISTS
            (SELECT 1 FROM renewal_slots
             WHERE slot = CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0));
        UPDATE renewal_slots SET n = n + 1
            WHERE slot = CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0);
    END;
    CREATE TRIGGER renewal_slot_removed AFTER DELETE ON renewals
    BEGIN
        UPDATE renewal_slots SET n = n - 1
            WHERE slot = CAST(old.due_at / 10800 AS INTEGER) - (old.due_at < 0);
    END;
    CREATE TRIGGER renewal_slot_moved AFTER UPDATE OF due_at ON renewals
    WHEN old.due_at IS NOT new.due_at
    BEGIN
        UPDATE renewal_slots SET n = n - 1
            WHERE slot = CAST(old.due_at / 10800 AS INTEGER) - (old.due_at < 0);
        INSERT INTO renewal_slots (slot, n)
            SELECT CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0), 0 WHERE NOT EXISTS
            (SELECT 1 FROM renewal_slots
             WHERE slot = CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0));
        UPDATE renewal_slots SET n = n + 1
            WHERE slot = CAST(new.due_at / 10800 AS INTEGER) - (new.due_at < 0);
    END;
    """,
)

RENEWAL_SLOT_SECONDS = 10800.0  # migration 9's grid: floor(due_at / 3 h)

SCHEMA_VERSION = len(MIGRATIONS)
