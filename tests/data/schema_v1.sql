CREATE TABLE runs (
    run_id       TEXT PRIMARY KEY,
    machine      TEXT NOT NULL,
    machine_ref  TEXT NOT NULL,
    machine_hash TEXT NOT NULL,
    input        TEXT NOT NULL,
    options      TEXT NOT NULL DEFAULT '{}',
    status       TEXT NOT NULL,
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    owner        TEXT,
    owner_info   TEXT
);
CREATE INDEX runs_by_created ON runs (created_at);
CREATE INDEX runs_by_machine ON runs (machine, created_at);
CREATE TABLE transitions (
    run_id             TEXT NOT NULL REFERENCES runs (run_id),
    seq                INTEGER NOT NULL,
    from_state         TEXT NOT NULL,
    to_state           TEXT,
    decision           TEXT,
    reason             TEXT,
    attempt            INTEGER NOT NULL,
    started_at         TEXT NOT NULL,
    latency_ms         REAL NOT NULL,
    source             TEXT NOT NULL,
    input_tokens       INTEGER NOT NULL DEFAULT 0,
    output_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    error              TEXT,
    output             TEXT,
    request            TEXT,
    response           TEXT,
    request_id         TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE VIEW llm_calls AS
    SELECT run_id, seq, from_state AS state, request_id, request, response,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, started_at, latency_ms
    FROM transitions WHERE source = 'llm' AND request IS NOT NULL;
CREATE VIEW step_outputs AS
    SELECT run_id, seq, from_state AS state, output FROM transitions
    WHERE output IS NOT NULL AND to_state IS NOT NULL;
CREATE VIEW run_totals AS
    SELECT run_id, count(to_state) AS steps, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
           sum(cache_write_tokens) AS cache_write_tokens, sum(latency_ms) AS latency_ms
    FROM transitions GROUP BY run_id;
