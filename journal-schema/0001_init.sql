-- nemoclaw journal, schema version 1.
-- Forward-only: never edit a released migration; add 0002_*.sql instead.
-- Timestamps are integer milliseconds since the Unix epoch (UTC).
-- JSON columns hold UTF-8 JSON text; secrets are redacted before they are written.

-- Small key/value facts about this journal (creation time, prune checkpoints, guards).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- One row per run of a plan (a rebuild, a synthetic test plan, ...).
CREATE TABLE runs (
    id               TEXT PRIMARY KEY NOT NULL,          -- UUID v7 (time-ordered)
    lock_key         TEXT NOT NULL,                      -- what the runner lock protects, e.g. 'local/demo'
    plan             TEXT NOT NULL,                      -- plan name, e.g. 'rebuild'
    plan_fingerprint TEXT NOT NULL,                      -- sha256 of the step names and versions
    sandbox          TEXT,                               -- sandbox name, when the plan is about one
    gateway          TEXT,                               -- gateway binding, when the plan is about one
    mode             TEXT,                               -- plan-specific, e.g. 'normal' | 'stale'
    state            TEXT NOT NULL CHECK (state IN (
                        'running', 'succeeded', 'failed', 'interrupted',
                        'needs_operator', 'rolling_back', 'rolled_back')),
    params           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(params)),
    binary_version   TEXT NOT NULL,
    host             TEXT NOT NULL,
    user             TEXT NOT NULL,
    pid              INTEGER NOT NULL,
    argv             TEXT NOT NULL CHECK (json_valid(argv)),  -- JSON array of strings
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER,                            -- set when state is succeeded/rolled_back
    error            TEXT
) STRICT;
CREATE INDEX runs_by_created ON runs (created_at DESC);
CREATE INDEX runs_by_sandbox ON runs (sandbox, created_at DESC);
CREATE INDEX runs_by_state ON runs (state, created_at DESC);

-- One row per step of a run, created with the run (state 'pending').
CREATE TABLE steps (
    run_id         TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL CHECK (seq >= 0),    -- 0-based position in the plan
    name           TEXT NOT NULL,
    version        INTEGER NOT NULL,
    destructive    INTEGER NOT NULL CHECK (destructive IN (0, 1)),
    state          TEXT NOT NULL CHECK (state IN (
                      'pending', 'started', 'done', 'failed',
                      'compensating', 'compensated')),
    attempt        INTEGER NOT NULL DEFAULT 0,           -- how many times apply was started
    input          TEXT CHECK (input IS NULL OR json_valid(input)),
    output         TEXT CHECK (output IS NULL OR json_valid(output)),
    error          TEXT,
    started_at     INTEGER,
    finished_at    INTEGER,
    compensated_at INTEGER,
    PRIMARY KEY (run_id, seq)
) STRICT;

-- Append-only audit log. Every state change of a run or step writes its event in the same
-- transaction. Events form one hash chain over the whole journal:
--   hash = sha256(prev_hash '|' id '|' run_id '|' step_seq '|' at '|' kind '|' data)
-- (NULLs as empty strings; see journal-schema/README.md).
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,                       -- strictly increasing, gap-free until prune
    run_id    TEXT,                                      -- NULL for journal-wide events (prune checkpoint)
    step_seq  INTEGER,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    data      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data)),
    prev_hash TEXT NOT NULL CHECK (length(prev_hash) = 64),
    hash      TEXT NOT NULL CHECK (length(hash) = 64)
) STRICT;
CREATE INDEX events_by_run ON events (run_id, id);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

-- Only `journal prune` may delete events, and only while it holds the write transaction that
-- also records the prune checkpoint (meta key 'prune_in_progress').
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
WHEN (SELECT value FROM meta WHERE key = 'prune_in_progress') IS NULL
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

-- Who holds each runner lock. The kernel lock (flock on <home>/locks/<key>.lock) is the truth;
-- this row tells others who the holder is and lets a takeover be journaled.
CREATE TABLE holders (
    lock_key    TEXT PRIMARY KEY NOT NULL,
    run_id      TEXT,
    pid         INTEGER NOT NULL,
    host        TEXT NOT NULL,
    started_at  INTEGER NOT NULL,                        -- when the holder process started
    acquired_at INTEGER NOT NULL
) STRICT;
