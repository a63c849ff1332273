-- Two runs written by statemachine_orch at commit 23e2431 (schema version 5), whose audit
-- chain hashed Python reprs (chain version 1); never regenerate: it proves old files verify.
BEGIN TRANSACTION;
CREATE TABLE attempts (
    run_id             TEXT NOT NULL,
    seq                INTEGER NOT NULL,
    attempt            INTEGER NOT NULL,
    state              TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    kind               TEXT NOT NULL,
    status_code        INTEGER,
    request_id         TEXT,
    delay_s            REAL,
    error              TEXT NOT NULL,
    input_tokens       INTEGER NOT NULL DEFAULT 0,
    output_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd           REAL,
    request            TEXT,
    response           TEXT,
    PRIMARY KEY (run_id, seq, attempt)
);
INSERT INTO "attempts" VALUES('old-a',1,1,'draft','2026-12-06T19:56:12.936617Z','transient',529,'req_fake_000001',0.0,'Messages API returned 529: overloaded_error: Overloaded',0,0,0,0,NULL,'{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Draft an entry for: a tent, café"}]}',NULL);
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
    owner_info   TEXT,
    in_flight    TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    steps         INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL DEFAULT 0,
    cache_hits    INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "runs" VALUES('old-a','ledger','/tmp/gen5/m.py:machine','ae6ab4921c97f3e3c6876cac4eb6696f80e0066330b3b99845db6b14808d5e06','{"text":"a tent, café"}','{}','completed',NULL,'2026-12-06T19:56:11.747499Z','2026-12-06T19:56:13.082046Z',NULL,NULL,'{"seq":3,"state":"review","at":"2026-12-06T19:56:13.037917Z"}',3,3,28,9,0.000219,0);
INSERT INTO "runs" VALUES('old-b','ledger','/tmp/gen5/m.py:machine','ae6ab4921c97f3e3c6876cac4eb6696f80e0066330b3b99845db6b14808d5e06','{"text":"a tent, café"}','{}','completed',NULL,'2026-12-06T19:56:13.642985Z','2026-12-06T19:56:14.850469Z',NULL,NULL,'{"seq":3,"state":"review","at":"2026-12-06T19:56:14.804125Z"}',3,3,28,9,0.000219,0);
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
    cost_usd           REAL,
    error              TEXT,
    output             TEXT,
    request            TEXT,
    response           TEXT,
    request_id         TEXT,
    request_hash       TEXT,
    in_doubt           INTEGER NOT NULL DEFAULT 0,
    chain              TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
INSERT INTO "transitions" VALUES('old-a',1,'draft','measure','continue','no guard: continue',1,'2026-12-06T19:56:11.748389Z',1.28811322000001382548e+03,'llm',12,7,0,0,0.000141,NULL,'"draft é   done"','{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Draft an entry for: a tent, café"}]}','{"id":"msg_fake_000002","content":[{"text":"draft é   done","type":"text"}],"model":"claude-sonnet-4-5","role":"assistant","stop_reason":"end_turn","type":"message","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":12,"output_tokens":7}}','req_fake_000002',NULL,0,'d354aca14bb9c85c6957e4cb9722daa2528ef9d38fab916d39b6497207c4b3ea');
INSERT INTO "transitions" VALUES('old-a',2,'measure','review','continue','no guard: continue',1,'2026-12-06T19:56:13.037392Z',1.16583000021819316316e-01,'python',0,0,0,0,0.0,NULL,'{"chars":14,"ratio":0.1}',NULL,NULL,NULL,NULL,0,'45af444fd027f3622ef325a7b1f1b764cad68ed011906b3451a7b9c85cd279c3');
INSERT INTO "transitions" VALUES('old-a',3,'review','__end__','continue','no guard: continue',1,'2026-12-06T19:56:13.037878Z',4.40096600000288162846e+01,'llm',16,2,0,0,7.8e-05,NULL,'"looks fine"','{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Review: draft é   done"}]}','{"id":"msg_fake_000003","content":[{"text":"looks fine","type":"text"}],"model":"claude-sonnet-4-5","role":"assistant","stop_reason":"end_turn","type":"message","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":16,"output_tokens":2}}','req_fake_000003',NULL,0,'f2dfb043c8e1afb5bd328ba2583276f544e76ff245a2899631abaeec3b7b434d');
INSERT INTO "transitions" VALUES('old-b',1,'draft','measure','continue','no guard: continue',1,'2026-12-06T19:56:13.644423Z',1.15796777200000633456e+03,'llm',12,7,0,0,0.000141,NULL,'"draft é   done"','{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Draft an entry for: a tent, café"}]}','{"id":"msg_fake_000004","content":[{"text":"draft é   done","type":"text"}],"model":"claude-sonnet-4-5","role":"assistant","stop_reason":"end_turn","type":"message","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":12,"output_tokens":7}}','req_fake_000004',NULL,0,'79387e7c668693f2b18dcf5d40e334341a0174cebceff5bd1176e046876d19af');
INSERT INTO "transitions" VALUES('old-b',2,'measure','review','continue','no guard: continue',1,'2026-12-06T19:56:14.803479Z',1.82922000021790154278e-01,'python',0,0,0,0,0.0,NULL,'{"chars":14,"ratio":0.1}',NULL,NULL,NULL,NULL,0,'654eca01f0eadea38bf7996ffe450a8622baa5b6280bad51f3c84698016a59d1');
INSERT INTO "transitions" VALUES('old-b',3,'review','__end__','continue','no guard: continue',1,'2026-12-06T19:56:14.804074Z',4.62142199999675540311e+01,'llm',16,2,0,0,7.8e-05,NULL,'"looks fine"','{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Review: draft é   done"}]}','{"id":"msg_fake_000005","content":[{"text":"looks fine","type":"text"}],"model":"claude-sonnet-4-5","role":"assistant","stop_reason":"end_turn","type":"message","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":16,"output_tokens":2}}','req_fake_000005',NULL,0,'1f57a2d3adc5b33d30b17dc73af7179fc4adecfe2c4843a4c5f5e4e6d6af8bad');
CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_machine ON runs (machine, created_at);
CREATE INDEX transitions_by_request_hash ON transitions (request_hash)
    WHERE request_hash IS NOT NULL;
CREATE INDEX runs_finished_totals ON runs (machine, status, steps, input_tokens, output_tokens, cost_usd,
    cache_hits) WHERE status IN ('completed', 'terminated');
CREATE INDEX runs_unfinished ON runs (machine, status) WHERE status NOT IN ('completed', 'terminated');
CREATE VIEW llm_calls AS
    SELECT run_id, seq, from_state AS state, request_id, request, response,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
           started_at, latency_ms
    FROM transitions WHERE source IN ('llm', 'fallback') AND response IS NOT NULL;
CREATE VIEW step_outputs AS
    SELECT run_id, seq, from_state AS state, output FROM transitions
    WHERE output IS NOT NULL AND to_state IS NOT NULL;
CREATE VIEW run_totals AS
    SELECT run_id, count(to_state) AS steps, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
           sum(cache_write_tokens) AS cache_write_tokens,
           CASE WHEN sum(cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd,
           sum(source = 'cache') AS cache_hits, sum(latency_ms) AS latency_ms
    FROM transitions GROUP BY run_id;
COMMIT;
PRAGMA application_id=1330791240;
PRAGMA user_version=5;
