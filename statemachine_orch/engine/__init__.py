"""How a machine runs: one step at a time through a `transitions` FSM, committed to a `Store`.

The engine talks to the outside only through ports: `store._contract.Store`, the model
client of `llm._client`, and `hooks.Hook`; the adapters are given to it, never imported.
"""
