"""Built-in sampler plugins: generate completions from the policy's current weights for online algorithms."""
