"""From a batch to per-sequence log-probs: batch layouts, the chunked output head, pair assembly."""
