"""Plugin loading: hook specs, entry points, and one registry per kind of plugin."""
