"""Built-in algorithm plugins: phases of training driven through the engine."""
