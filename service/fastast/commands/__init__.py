"""Sub-commands of the `fastast` CLI, discovered by fastast.cli (one module per command)."""
