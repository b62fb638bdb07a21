"""The `loracast` command line and the server processes it starts: the top layer, above every component.

Nothing in `loracast` (the shared bottom package) or in the components imports it; tests/test_layers.py checks.
"""
