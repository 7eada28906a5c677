"""``make demo``: the orchestrator that runs the users' commands on the embedded default, and its report."""
