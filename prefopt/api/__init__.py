"""The contracts plugins code against: losses, tasks, algorithms, samplers and judges."""
