"""The example machines with their inputs and offline answers. Installed as
`statemachine_orch.examples`, so that `orch demo` runs wherever the package is installed."""
