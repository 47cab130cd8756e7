"""Analysis of data and trained runs: profile, ablate (+ ablated batches), report, sanity."""
