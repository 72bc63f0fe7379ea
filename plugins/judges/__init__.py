"""Built-in judge plugins: which of a prompt's sampled completions is better, for online algorithms."""
