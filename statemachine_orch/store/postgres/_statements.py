"""The SQL of the PostgreSQL store's writes and summaries (psycopg `%s` placeholders)."""

from __future__ import annotations

from .._chain import CHAINED_COLUMNS, ROW_COLUMNS
from ._lease import HOLDER_ALIVE

# The fence: the run's totals (and its status, when it changes) are updated only while this
# claim owns it (owner token and lease epoch), its holder's lease is live, and the row is the
# run's next step; no row changed means nothing is inserted (`_not_appended` says why).
ADVANCE = (
    "UPDATE runs SET last_seq = %(seq)s, steps = steps + %(step)s, input_tokens = input_tokens + %(input_tokens)s, "
    "output_tokens = output_tokens + %(output_tokens)s, cache_hits = cache_hits + %(cache_hit)s, "
    "cost_usd = CASE WHEN cost_usd IS NULL OR %(cost)s::float8 IS NULL THEN NULL ELSE cost_usd + %(cost)s END, "
    "status = coalesce(%(status)s::text, status), "
    "error = CASE WHEN %(status)s::text IS NULL THEN error ELSE %(error)s END, "
    "updated_at = CASE WHEN %(status)s::text IS NULL THEN updated_at ELSE %(now)s END, "
    "owner = CASE WHEN %(release)s THEN NULL ELSE owner END, "
    "owner_info = CASE WHEN %(release)s THEN NULL ELSE owner_info END, "
    "holder = CASE WHEN %(release)s THEN NULL ELSE holder END "
    "WHERE run_id = %(run_id)s AND owner = %(owner)s AND lease_epoch = %(epoch)s AND last_seq = %(seq)s - 1 "
    f"AND {HOLDER_ALIVE}"
)
# The step in one statement (one round trip, atomic without a transaction): the log row is
# inserted only if the fence let the update through; 0 rows means nothing was written.
_TYPES = {"seq": "bigint", "attempt": "bigint", "latency_ms": "float8", "input_tokens": "bigint",
          "output_tokens": "bigint", "cache_read_tokens": "bigint", "cache_write_tokens": "bigint",
          "cost_usd": "float8", "in_doubt": "integer"}
STEP = (f"WITH fenced AS ({ADVANCE} RETURNING 1) INSERT INTO transitions ({CHAINED_COLUMNS}, chain) SELECT "
        + ", ".join(f"%(row_{c})s::{_TYPES.get(c, 'text')}" for c in (*ROW_COLUMNS, "chain")) + " FROM fenced")
APPEND_ATTEMPT = (
    "INSERT INTO attempts (run_id, seq, attempt, state, started_at, kind, status_code, request_id, "
    "delay_s, error, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, "
    f"request, response) VALUES ({', '.join(['%s'] * 17)})"
)
MARK = f"UPDATE runs SET in_flight = %s WHERE run_id = %s AND owner = %s AND lease_epoch = %s AND {HOLDER_ALIVE}"
SET_STATUS = (
    "UPDATE runs SET status = %(status)s, error = %(error)s, updated_at = %(now)s, "
    "review = coalesce(%(review)s, review), "
    "owner = CASE WHEN %(keep)s THEN owner ELSE NULL END, "
    "owner_info = CASE WHEN %(keep)s THEN owner_info ELSE NULL END, "
    "holder = CASE WHEN %(keep)s THEN holder ELSE NULL END "
    f"WHERE run_id = %(run_id)s AND owner = %(owner)s AND lease_epoch = %(epoch)s AND {HOLDER_ALIVE}"
)
# a claim: fenced on the claimer's own lease being live (no row: it expired, claim nothing)
TAKE = (
    "UPDATE runs SET status = 'running', error = NULL, updated_at = %(now)s, owner = %(owner)s, "
    "owner_info = %(info)s, holder = %(holder)s, lease_epoch = lease_epoch + 1, "
    "options = coalesce(%(options)s, options) WHERE run_id = %(run_id)s AND EXISTS (SELECT 1 FROM workers w "
    "WHERE w.key = %(holder)s AND w.expires_at > clock_timestamp()) RETURNING lease_epoch"
)
INSERT_RUN = (
    "INSERT INTO runs (run_id, machine, machine_ref, machine_hash, input, created_at, chain_version, chain_key, "
    "parent_run_id, parent_state, item, batch_id, forked_from, experiment, arm, chain_anchor, options, status, error, "
    f"updated_at, owner, owner_info, holder, lease_epoch, queue) VALUES ({', '.join(['%s'] * 25)})"
)
# a run's holder, judged by its lease (the run row locked): whether it lives and when its lease ends
HOLDER_FOR_UPDATE = (
    "SELECT r.status, r.owner, r.owner_info, r.holder, w.name AS worker, w.expires_at, "
    "coalesce(w.expires_at > clock_timestamp(), false) AS alive FROM runs r "
    "LEFT JOIN workers w ON w.key = r.holder WHERE r.run_id = %s FOR UPDATE OF r"
)
# the oldest run of a queue that a worker may take: never started, abandoned by its holder, or waiting for a
# review whose deadline has passed (its on_timeout applies)
NEXT_IN_QUEUE = (
    "SELECT run_id FROM runs WHERE queue = %s AND parent_run_id IS NULL "
    "AND (machine_hash = ANY(%s) OR machine = ANY(%s)) "
    f"AND (status = 'pending' OR (status = 'running' AND NOT {HOLDER_ALIVE}) "
    "OR (status = 'waiting' AND (review::jsonb ->> 'deadline') COLLATE \"C\" <= %s)) "
    "ORDER BY created_at, run_id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
STALE = f"(status = 'running' AND NOT {HOLDER_ALIVE}) AS stale"
_DOUBTS_OF_RUN = "FROM attempts a WHERE a.run_id = runs.run_id AND a.kind = 'in_doubt'"
_DOUBT_COST = ("CASE WHEN count(*) FILTER (WHERE a.cost_usd IS NULL) > 0 THEN NULL "
               "ELSE coalesce(sum(a.cost_usd), 0.0) END")
SUMMARY = ("run_id, machine, status, created_at, updated_at, error, steps, input_tokens, output_tokens, cost_usd, "
           "forked_from, experiment, arm, "
           f"(SELECT count(*) {_DOUBTS_OF_RUN}) AS in_doubt_calls, (SELECT {_DOUBT_COST} {_DOUBTS_OF_RUN}) "
           f"AS in_doubt_usd, {STALE}")
MACHINE_TOTALS = (
    "SELECT machine, count(*) AS runs, sum(steps)::bigint AS steps, sum(input_tokens)::bigint AS input_tokens, "
    "sum(output_tokens)::bigint AS output_tokens, "
    "CASE WHEN count(*) FILTER (WHERE cost_usd IS NULL) > 0 THEN NULL ELSE sum(cost_usd) END AS cost_usd, "
    "sum(cache_hits)::bigint AS cache_hits FROM runs WHERE machine = ANY(%s) GROUP BY machine ORDER BY machine"
)
DOUBTS_BY_MACHINE = (
    f"SELECT r.machine, count(*) AS in_doubt_calls, {_DOUBT_COST} AS in_doubt_usd FROM attempts a "
    "JOIN runs r ON r.run_id = a.run_id WHERE a.kind = 'in_doubt' AND r.machine = ANY(%s) GROUP BY r.machine"
)
WORKERS = (
    "SELECT w.key, w.name, w.host, w.pid, w.queue, w.machines, w.stopping, w.started_at, "
    "extract(epoch FROM clock_timestamp() - w.heartbeat_at)::float8 AS heartbeat_age_s, "
    "extract(epoch FROM w.expires_at - clock_timestamp())::float8 AS expires_in_s, "
    "coalesce((SELECT array_agg(r.run_id ORDER BY r.run_id) FROM runs r WHERE r.holder = w.key "
    "AND r.status = 'running'), '{}') AS runs "
    "FROM workers w WHERE w.expires_at > clock_timestamp() ORDER BY w.started_at, w.key"
)
