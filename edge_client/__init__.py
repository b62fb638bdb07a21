"""The edge client: asks a worker by description, by document or by adapter id, and streams the answer."""
