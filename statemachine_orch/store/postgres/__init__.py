"""The PostgreSQL store: runs shared by many hosts, with a run queue and leases for `orch worker`."""
