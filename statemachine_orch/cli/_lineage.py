"""`orch runs --tree RUN_ID`: a run's lineage, from its first ancestor down through every fork
(`orch fork`), as a tree. It reads the store only, as the other reading commands do."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from ..errors import RunNotFoundError
from ..store._contract import Store
from ..types import RunRecord, total_cost
from ._options import with_store
from ._render import aligned, one_line, status_text, usd


@dataclass(slots=True, kw_only=True)
class Node:
    """One run of the tree, with the lines that lead to it (`├─ `, `│  `...)."""

    record: RunRecord
    depth: int
    prefix: str
    steps: int
    cost_usd: float | None

    def to_json(self, asked: str) -> dict[str, Any]:
        fork = self.record.options.get("fork") or {}
        return {"run_id": self.record.run_id, "forked_from": self.record.forked_from, "depth": self.depth,
                "label": fork.get("label"), "forked_at": fork.get("at"), "fork_state": fork.get("state"),
                "status": self.record.status.value, "steps": self.steps, "cost_usd": self.cost_usd,
                "asked": self.record.run_id == asked}


async def lineage(store: Store, run_id: str) -> list[Node]:
    """The tree holding `run_id`: its first ancestor still stored, then each fork under the run
    it was forked from, oldest first."""
    root = await store.get_run(run_id)
    seen = {root.run_id}
    while root.forked_from is not None and root.forked_from not in seen:
        try:
            root = await store.get_run(root.forked_from)
        except RunNotFoundError:  # deleted: the tree starts below it
            break
        seen.add(root.run_id)
    nodes: list[Node] = []

    async def visit(record: RunRecord, depth: int, lead: str, branch: str) -> None:
        log = await store.transitions(record.run_id)
        nodes.append(Node(record=record, depth=depth, prefix=lead + branch, steps=sum(r.committed for r in log),
                          cost_usd=total_cost(log)))
        forks = sorted(await store.list_runs(forked_from=record.run_id, limit=None),
                       key=lambda s: (s.created_at, s.run_id))
        under = lead + ("" if depth == 0 else "   " if branch == "└─ " else "│  ")
        for n, fork in enumerate(forks, 1):
            await visit(await store.get_run(fork.run_id), depth + 1, under, "└─ " if n == len(forks) else "├─ ")

    await visit(root, 0, "", "")
    return nodes


def cmd_tree(args: argparse.Namespace) -> int:
    nodes = with_store(args, lambda store: lineage(store, args.tree))
    if args.json:
        print(json.dumps([node.to_json(args.tree) for node in nodes]))
        return 0
    rows = []
    for node in nodes:
        fork = node.record.options.get("fork") or {}
        rows.append((node.prefix + node.record.run_id, one_line(fork.get("label"), 40) or "-",
                     f"seq {fork.get('at')} ({fork.get('state')})" if node.record.forked_from else "-",
                     status_text(node.record.status, node.record.stale), node.steps, usd(node.cost_usd),
                     "<- this run" if node.record.run_id == args.tree else ""))
    print("\n".join(aligned([("run_id", "label", "forked at", "status", "steps", "cost", ""), *rows])))
    paid = [n.cost_usd for n in nodes]
    print(f"{len(nodes)} run(s) in the tree, {len(nodes) - 1} fork(s); paid in all: "
          f"{usd(None if None in paid else sum(p or 0.0 for p in paid))}")
    return 0
