"""Runtime plumbing: the bridge thread that owns the actor system, the Thespian fixes (applied
explicitly), and process-tree tools that find every process of a run."""
