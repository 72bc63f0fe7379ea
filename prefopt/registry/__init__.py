"""Plugin loading: hook specs, the one table of plugin kinds, entry points, and one registry per kind."""
