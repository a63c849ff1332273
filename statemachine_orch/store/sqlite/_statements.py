"""The SQL of the per-step writes and of the in-doubt totals, as the store runs them.

The per-step writes are the store's hot path: a few prepared statements, written once here.
"""

from __future__ import annotations

from .._chain import CHAINED_COLUMNS

# The fence: the run's totals (and its status, when it changes) are updated only while we
# own it and the row is the run's next step; no row changed means another process took the
# run or advanced it, and nothing is inserted.
# `STEP` is the common case of `ADVANCE` (the run goes on, its status stays): fewer terms.
STEP = (
    "UPDATE runs SET last_seq = ?1, steps = steps + ?2, input_tokens = input_tokens + ?3, "
    "output_tokens = output_tokens + ?4, cache_hits = cache_hits + ?5, "
    "cost_usd = CASE WHEN cost_usd IS NULL OR ?6 IS NULL THEN NULL ELSE cost_usd + ?6 END "
    "WHERE run_id = ?7 AND owner = ?8 AND last_seq = ?1 - 1"
)
ADVANCE = (
    "UPDATE runs SET last_seq = :seq, steps = steps + :step, input_tokens = input_tokens + :input_tokens, "
    "output_tokens = output_tokens + :output_tokens, cache_hits = cache_hits + :cache_hit, "
    "cost_usd = CASE WHEN cost_usd IS NULL OR :cost IS NULL THEN NULL ELSE cost_usd + :cost END, "
    "status = :status, error = :error, updated_at = :now, "
    "owner = CASE WHEN :release THEN NULL ELSE owner END, "
    "owner_info = CASE WHEN :release THEN NULL ELSE owner_info END "
    "WHERE run_id = :run_id AND owner = :owner AND last_seq = :seq - 1"
)
APPEND = f"INSERT INTO transitions ({CHAINED_COLUMNS}, chain) VALUES ({','.join('?' * 23)})"
APPEND_ATTEMPT = (
    "INSERT INTO attempts (run_id, seq, attempt, state, started_at, kind, status_code, request_id, "
    "delay_s, error, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, "
    "request, response) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Calls in doubt (in flight when a process died, counted at their worst case) are attempts.
_DOUBT_COST = "CASE WHEN sum(a.cost_usd IS NULL) > 0 THEN NULL ELSE coalesce(sum(a.cost_usd), 0.0) END"
_DOUBTS_OF_RUN = "FROM attempts a WHERE a.run_id = runs.run_id AND a.kind = 'in_doubt'"
IN_DOUBT_OF_RUN = (f"(SELECT count(*) {_DOUBTS_OF_RUN}) AS in_doubt_calls, "
                    f"(SELECT {_DOUBT_COST} {_DOUBTS_OF_RUN}) AS in_doubt_usd")
IN_DOUBT_BY_MACHINE = (f"SELECT r.machine, count(*) AS in_doubt_calls, {_DOUBT_COST} AS in_doubt_usd FROM attempts a "
                        "JOIN runs r ON r.run_id = a.run_id WHERE a.kind = 'in_doubt' AND r.machine IN ")
SET_STATUS = (
    "UPDATE runs SET status = ?, error = ?, updated_at = ?, review = coalesce(?, review), "
    "owner = CASE WHEN ? THEN owner ELSE NULL END, "
    "owner_info = CASE WHEN ? THEN owner_info ELSE NULL END "
    "WHERE run_id = ? AND owner = ?"
)
