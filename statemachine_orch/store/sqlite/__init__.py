"""The SQLite backend: schema and migrations, the audit chain, liveness, and the store itself."""
