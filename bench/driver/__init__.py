"""What every benchmark of ``bench/`` shares: the run loop and its results file, the run's
metadata, the common command-line flags, fresh processes and probes."""
