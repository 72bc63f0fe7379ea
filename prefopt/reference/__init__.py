"""Reference log-probs: providers (live, following the policy), the on-disk cache, and their setup for a run."""
