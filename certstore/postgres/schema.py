"""Versioned PostgreSQL schema: the SQLite schema's tables and triggers in PL/pgSQL.

Each migration moves the one row of `schema_version` up by one; every process applies
the missing ones at start, serialised by a transaction-level advisory lock (so several
workers starting at once on an empty database migrate it once). Append new
migrations; never edit a released one.

Types: BYTEA for blobs, DOUBLE PRECISION for times (the store's clock is a float and
the contract tests move it: no column defaults to now()), hostnames ``COLLATE "C"``
so that keyset pages are in byte order whatever the database's locale, as in SQLite.
"""

from __future__ import annotations

# Advisory lock keys (one-bigint key space). The two-int space holds the rate buckets
# (RATE_LOCK_CLASS, hashtext(bucket)); PostgreSQL keeps the two spaces apart.
MIGRATION_LOCK = 0x6C6E6B6564670001  # "lnkedg" + 1: schema migrations
EVENT_LOCK = 0x6C6E6B6564670002  # every insert into events (ids in commit order)
RATE_LOCK_CLASS = 0x6C6E  # first key of a rate bucket's lock

NOTIFY_CHANNEL = "linkedge_events"
EXPIRY_BUCKET_SECONDS = 3600  # migration 4: certificates counted per hour of expiry

MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of SQLite's migrations 1-6 at once
    f"""
    CREATE TABLE meta (
        key TEXT COLLATE "C" PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE domains (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        account TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        cname_target_seen TEXT,
        verified_at DOUBLE PRECISION,
        last_check_at DOUBLE PRECISION,
        last_check_reason TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        state_reason TEXT NOT NULL DEFAULT '',
        state_changed_at DOUBLE PRECISION,
        next_check_at DOUBLE PRECISION,
        failed_checks INTEGER NOT NULL DEFAULT 0,
        last_report TEXT
    );
    CREATE INDEX domains_due ON domains (next_check_at) WHERE next_check_at IS NOT NULL;
    CREATE INDEX domains_by_account ON domains (account, hostname);
    CREATE INDEX domains_by_state ON domains (state, hostname);
    CREATE TABLE acme_accounts (
        directory_url TEXT PRIMARY KEY,
        uri TEXT NOT NULL,
        key_sealed BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE certificates (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        chain_pem BYTEA NOT NULL,
        key_sealed BYTEA NOT NULL,
        names TEXT NOT NULL,
        not_before DOUBLE PRECISION NOT NULL,
        not_after DOUBLE PRECISION NOT NULL,
        issuer TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        serial TEXT NOT NULL DEFAULT '',
        directory_url TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX certificates_by_expiry ON certificates (not_after);
    CREATE TABLE challenges (
        token TEXT PRIMARY KEY,
        key_authorization TEXT NOT NULL,
        hostname TEXT COLLATE "C" NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX challenges_by_host ON challenges (hostname);
    CREATE TABLE alpn_challenges (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        key_authorization TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        node TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX leases_by_process ON leases (node, pid);
    CREATE TABLE renewals (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        due_at DOUBLE PRECISION NOT NULL,
        next_check_at DOUBLE PRECISION NOT NULL,
        source TEXT NOT NULL,
        last_error TEXT,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX renewals_by_next_check ON renewals (next_check_at);
    -- certificates without a renewal plan, kept by triggers: the maintenance queue's
    -- "no plan yet" part without an anti-join over every certificate
    CREATE TABLE unplanned_certificates (
        hostname TEXT COLLATE "C" PRIMARY KEY
    );
    CREATE TABLE rate_log (
        id BIGSERIAL PRIMARY KEY,
        bucket TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rate_log_by_bucket ON rate_log (bucket, at);
    CREATE INDEX rate_log_by_time ON rate_log (at);
    CREATE TABLE host_backoff (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        failures INTEGER NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE host_options (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        options TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE host_files (
        hostname TEXT COLLATE "C" NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        content BYTEA NOT NULL,
        etag TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (hostname, kind)
    );
    CREATE TABLE pending_orders (
        hostname TEXT COLLATE "C" PRIMARY KEY,
        directory_url TEXT NOT NULL,
        order_url TEXT NOT NULL,
        account_uri TEXT NOT NULL,
        key_sealed BYTEA NOT NULL,
        names TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE ca_breakers (
        directory_url TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        failures INTEGER NOT NULL,
        opened_at DOUBLE PRECISION,
        next_probe_at DOUBLE PRECISION,
        last_error TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );

    -- The event log. `id` has no default: the BEFORE INSERT trigger assigns it.
    CREATE SEQUENCE events_id_seq AS BIGINT;
    CREATE TABLE events (
        id BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        hostname TEXT COLLATE "C",
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT
    );
    ALTER SEQUENCE events_id_seq OWNED BY events.id;
    CREATE INDEX events_by_host ON events (hostname, id);

    -- Event ids in commit order. A sequence alone hands out ids in the order of the
    -- inserts, not of the commits: a transaction holding id 7 may commit after one
    -- holding id 8, and a follower that has just read 8 (`id > cursor`) would never see
    -- 7. So the id is taken only under a transaction-level advisory lock, held until
    -- commit: the next event's transaction waits for this one to end, so a visible id
    -- means every smaller id is visible (or rolled back) already. The price is that
    -- event-emitting transactions commit one at a time; they are all one short
    -- statement, and every trigger below inserts its event last (after its row
    -- locks), so the lock is held only for the commit and cannot close a lock cycle.
    CREATE FUNCTION linkedge_event_id() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({EVENT_LOCK});
        NEW.id := nextval('events_id_seq');
        RETURN NEW;
    END $$;
    CREATE TRIGGER events_id_in_commit_order BEFORE INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION linkedge_event_id();

    -- Push: every worker LISTENs and re-reads by cursor (the payload is only a hint;
    -- a missed notification costs at most the follower's poll interval). NOTIFY is
    -- delivered at commit, so a listener never hears of an id it cannot read.
    CREATE FUNCTION linkedge_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.id::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_notify AFTER INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION linkedge_event_notify();

    -- The store's time inside a trigger that has no row time to use (a deletion): the
    -- store sets `linkedge.now` for the transaction (set_config(..., true)); anything
    -- else (psql by hand) gets the server's clock.
    CREATE FUNCTION linkedge_now() RETURNS DOUBLE PRECISION LANGUAGE sql STABLE AS $$
        SELECT COALESCE(NULLIF(current_setting('linkedge.now', true), '')::double precision,
                        extract(epoch FROM clock_timestamp())::double precision)
    $$;

    -- Every state change is an event, whichever code path (or process) made it.
    CREATE FUNCTION linkedge_domain_state_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO events (at, hostname, kind, detail, from_state, to_state)
        VALUES (COALESCE(NEW.state_changed_at, 0), NEW.hostname, 'state',
                NEW.state_reason, OLD.state, NEW.state);
        RETURN NULL;
    END $$;
    CREATE TRIGGER domain_state_event AFTER UPDATE OF state ON domains
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
        EXECUTE FUNCTION linkedge_domain_state_event();

    CREATE FUNCTION linkedge_domain_registered() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (NEW.created_at, NEW.hostname, 'registered', 'account ' || NEW.account);
        RETURN NULL;
    END $$;
    CREATE TRIGGER domain_registered_event AFTER INSERT ON domains
        FOR EACH ROW EXECUTE FUNCTION linkedge_domain_registered();

    -- Removal takes everything of the host with it, in the same statement as its
    -- event. host_files goes last: its own trigger emits file_deleted events (taking
    -- the event lock), and no row lock may be taken after that lock.
    CREATE FUNCTION linkedge_domain_removed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM certificates WHERE hostname = OLD.hostname;
        DELETE FROM challenges WHERE hostname = OLD.hostname;
        DELETE FROM renewals WHERE hostname = OLD.hostname;
        DELETE FROM host_backoff WHERE hostname = OLD.hostname;
        DELETE FROM alpn_challenges WHERE hostname = OLD.hostname;
        DELETE FROM host_options WHERE hostname = OLD.hostname;
        DELETE FROM host_files WHERE hostname = OLD.hostname;
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (linkedge_now(), OLD.hostname, 'removed', 'domain and its certificate deleted');
        RETURN NULL;
    END $$;
    CREATE TRIGGER domain_removed AFTER DELETE ON domains
        FOR EACH ROW EXECUTE FUNCTION linkedge_domain_removed();

    -- Files and options served per host: every write is an event, atomically, so every
    -- worker's cache of them is invalidated.
    CREATE FUNCTION linkedge_host_file_written() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (NEW.updated_at, NEW.hostname, 'file_updated',
                NEW.kind || ': ' || length(NEW.content) || ' bytes, ETag ' || NEW.etag);
        RETURN NULL;
    END $$;
    CREATE TRIGGER host_file_written AFTER INSERT OR UPDATE ON host_files
        FOR EACH ROW EXECUTE FUNCTION linkedge_host_file_written();
    CREATE FUNCTION linkedge_host_file_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (linkedge_now(), OLD.hostname, 'file_deleted', OLD.kind);
        RETURN NULL;
    END $$;
    CREATE TRIGGER host_file_deleted AFTER DELETE ON host_files
        FOR EACH ROW EXECUTE FUNCTION linkedge_host_file_deleted();
    CREATE FUNCTION linkedge_host_options_written() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO events (at, hostname, kind, detail)
        VALUES (NEW.updated_at, NEW.hostname, 'options_changed', NEW.options);
        RETURN NULL;
    END $$;
    CREATE TRIGGER host_options_written AFTER INSERT OR UPDATE ON host_options
        FOR EACH ROW EXECUTE FUNCTION linkedge_host_options_written();

    -- The certificate of an order, the end of that order and the end of the old
    -- certificate's renewal plan are one statement.
    CREATE FUNCTION linkedge_certificate_stored() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM pending_orders WHERE hostname = NEW.hostname;
        DELETE FROM renewals WHERE hostname = NEW.hostname;
        INSERT INTO unplanned_certificates (hostname) VALUES (NEW.hostname)
            ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$;
    CREATE TRIGGER certificate_stored AFTER INSERT OR UPDATE ON certificates
        FOR EACH ROW EXECUTE FUNCTION linkedge_certificate_stored();
    CREATE FUNCTION linkedge_certificate_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname = OLD.hostname;
        RETURN NULL;
    END $$;
    CREATE TRIGGER certificate_deleted AFTER DELETE ON certificates
        FOR EACH ROW EXECUTE FUNCTION linkedge_certificate_deleted();
    CREATE FUNCTION linkedge_renewal_planned() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname = NEW.hostname;
        RETURN NULL;
    END $$;
    CREATE TRIGGER renewal_planned AFTER INSERT OR UPDATE ON renewals
        FOR EACH ROW EXECUTE FUNCTION linkedge_renewal_planned();
    """,
    # 2: a million hosts (issue 11): plans by due time (RenewalStore.renewal_load, the
    # leveling scheduler's plans per slot, and the renewal gauges read an index range)
    """
    CREATE INDEX renewals_by_due ON renewals (due_at);
    CREATE INDEX renewals_failing ON renewals (hostname)
        WHERE last_error IS NOT NULL AND last_error != '';
    """,
    # 3: a rate token in one call. The bucket's advisory lock used to be held across
    # three client round trips (lock, count-and-insert, commit): every order of the fleet
    # queued behind the slowest worker's event loop. Here it is held server-side only.
    """
    -- Race-free because the function is VOLATILE and runs in READ COMMITTED (every
    -- caller: one statement outside an explicit transaction): each statement inside it
    -- takes a new snapshot, so the INSERT's count, taken after PERFORM got the lock,
    -- sees every token a previous holder committed (its lock is released only after
    -- its commit is visible). Two callers can never both take the last token.
    CREATE FUNCTION linkedge_take_rate_token(lock_class integer, b text, now_at double precision,
                                             since double precision, lim integer)
    RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
    DECLARE token bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_class, hashtext(b));
        INSERT INTO rate_log (bucket, at) SELECT b, now_at
            WHERE (SELECT count(*) FROM rate_log WHERE bucket = b AND at > since) < lim
            RETURNING id INTO token;
        RETURN token;
    END $$;
    """,
    # 4: the gauges read counters kept by triggers (issue 11), as SQLite's since its
    # migrations 8-9: count_domains_by_state was a GROUP BY over every host (266 ms at a
    # million) and certificate_summary a scan of every certificate (303 ms), per scrape
    # of every worker of every node. And the triggers on certificates and plans work per
    # statement, so that a page of `store migrate` costs one trigger call per table.
    f"""
    CREATE TABLE domain_counts (
        state TEXT PRIMARY KEY,
        n BIGINT NOT NULL
    );
    INSERT INTO domain_counts (state, n) SELECT state, count(*) FROM domains GROUP BY state;

    -- Statement-level triggers over the statement's transition tables: one update per
    -- counter row per statement. Row-level ones updated a counter row once per row, and
    -- a transaction that writes many hosts (a page of `store migrate`) left a chain of
    -- versions of that row that every further update walked: 4x slower inserts.
    -- Lock order: a statement's counter rows are updated in key order, and statement
    -- triggers fire after the row triggers that insert events (the event lock first,
    -- then domain counters; certificate counters are taken before the event lock when
    -- a host's removal deletes its certificate).
    CREATE FUNCTION linkedge_domains_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO domain_counts (state, n)
                SELECT state, count(*) FROM new_rows GROUP BY state ORDER BY state
                ON CONFLICT (state) DO UPDATE SET n = domain_counts.n + EXCLUDED.n;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO domain_counts (state, n)
                SELECT state, -count(*) FROM old_rows GROUP BY state ORDER BY state
                ON CONFLICT (state) DO UPDATE SET n = domain_counts.n + EXCLUDED.n;
        ELSE
            INSERT INTO domain_counts (state, n)
                SELECT s, sum(d) FROM (
                    SELECT o.state, -1 FROM old_rows o JOIN new_rows w USING (hostname)
                        WHERE o.state IS DISTINCT FROM w.state
                    UNION ALL
                    SELECT w.state, 1 FROM old_rows o JOIN new_rows w USING (hostname)
                        WHERE o.state IS DISTINCT FROM w.state
                ) AS c (s, d) GROUP BY s HAVING sum(d) != 0 ORDER BY s
                ON CONFLICT (state) DO UPDATE SET n = domain_counts.n + EXCLUDED.n;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER domains_counted_inserted AFTER INSERT ON domains
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_domains_counted();
    CREATE TRIGGER domains_counted_deleted AFTER DELETE ON domains
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_domains_counted();
    CREATE TRIGGER domains_counted_updated AFTER UPDATE ON domains
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_domains_counted();

    -- Certificates per hour of expiry. "Expired by t" is then the hours before t's hour
    -- (a sum over at most a few thousand counter rows) plus the certificates of t's own
    -- hour up to t (a range of certificates_by_expiry holding an hour's expiries), for
    -- any t: the gauges' `now` and `now + horizon`. The one function both sides use
    -- puts a certificate in the same hour in the trigger and in the query.
    CREATE FUNCTION linkedge_expiry_hour(at DOUBLE PRECISION) RETURNS BIGINT
        LANGUAGE sql IMMUTABLE AS $$ SELECT floor(at / {EXPIRY_BUCKET_SECONDS})::bigint $$;
    CREATE TABLE certificate_expiry_counts (
        hour BIGINT PRIMARY KEY,
        n BIGINT NOT NULL
    );
    INSERT INTO certificate_expiry_counts (hour, n)
        SELECT linkedge_expiry_hour(not_after), count(*) FROM certificates GROUP BY 1;
    CREATE FUNCTION linkedge_certificates_counted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO certificate_expiry_counts (hour, n)
                SELECT linkedge_expiry_hour(not_after), count(*) FROM new_rows
                GROUP BY 1 ORDER BY 1
                ON CONFLICT (hour) DO UPDATE SET n = certificate_expiry_counts.n + EXCLUDED.n;
            RETURN NULL;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO certificate_expiry_counts (hour, n)
                SELECT linkedge_expiry_hour(not_after), -count(*) FROM old_rows
                GROUP BY 1 ORDER BY 1
                ON CONFLICT (hour) DO UPDATE SET n = certificate_expiry_counts.n + EXCLUDED.n;
        ELSE
            INSERT INTO certificate_expiry_counts (hour, n)
                SELECT h, sum(d) FROM (
                    SELECT linkedge_expiry_hour(not_after), -1 FROM old_rows
                    UNION ALL
                    SELECT linkedge_expiry_hour(not_after), 1 FROM new_rows
                ) AS c (h, d) GROUP BY h HAVING sum(d) != 0 ORDER BY h
                ON CONFLICT (hour) DO UPDATE SET n = certificate_expiry_counts.n + EXCLUDED.n;
        END IF;
        -- hours nobody expires in any more leave: the sum stays over live hours only
        DELETE FROM certificate_expiry_counts
            WHERE n = 0 AND hour IN (SELECT linkedge_expiry_hour(not_after) FROM old_rows);
        RETURN NULL;
    END $$;
    CREATE TRIGGER certificates_counted_inserted AFTER INSERT ON certificates
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_counted();
    CREATE TRIGGER certificates_counted_deleted AFTER DELETE ON certificates
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_counted();
    CREATE TRIGGER certificates_counted_updated AFTER UPDATE ON certificates
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_counted();

    -- What storing a certificate or a plan does to the other tables (migration 1), per
    -- statement as well: the same rows change in the same statement, one DELETE or
    -- INSERT each per statement instead of three per row (a page of a copy: 3x faster).
    DROP TRIGGER certificate_stored ON certificates;
    DROP TRIGGER certificate_deleted ON certificates;
    DROP TRIGGER renewal_planned ON renewals;
    DROP FUNCTION linkedge_certificate_stored();
    DROP FUNCTION linkedge_certificate_deleted();
    DROP FUNCTION linkedge_renewal_planned();
    CREATE FUNCTION linkedge_certificates_stored() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM pending_orders WHERE hostname IN (SELECT hostname FROM new_rows);
        DELETE FROM renewals WHERE hostname IN (SELECT hostname FROM new_rows);
        INSERT INTO unplanned_certificates (hostname)
            SELECT hostname FROM new_rows ORDER BY 1 ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$;
    CREATE TRIGGER certificates_stored_inserted AFTER INSERT ON certificates
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_stored();
    CREATE TRIGGER certificates_stored_updated AFTER UPDATE ON certificates
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_stored();
    CREATE FUNCTION linkedge_certificates_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname IN (SELECT hostname FROM old_rows);
        RETURN NULL;
    END $$;
    CREATE TRIGGER certificates_deleted AFTER DELETE ON certificates
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_certificates_deleted();
    CREATE FUNCTION linkedge_renewals_planned() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM unplanned_certificates WHERE hostname IN (SELECT hostname FROM new_rows);
        RETURN NULL;
    END $$;
    CREATE TRIGGER renewals_planned_inserted AFTER INSERT ON renewals
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_renewals_planned();
    CREATE TRIGGER renewals_planned_updated AFTER UPDATE ON renewals
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION linkedge_renewals_planned();
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
