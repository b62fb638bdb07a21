"""The coordinator: runs the hypernetworks, caches adapters by content, streams them to workers over gRPC."""
