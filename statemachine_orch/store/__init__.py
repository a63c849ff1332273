"""Where runs live: the `Store` contract every backend serves, and `open_store` to pick one."""
