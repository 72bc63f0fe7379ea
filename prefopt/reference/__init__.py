"""Reference log-probs: providers (cached, live, following the policy) and their setup for a run."""
