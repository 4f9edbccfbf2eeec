"""The ground floor every layer shares: the typed config, its loading and presets, the one
user-facing error type, storage through fsspec, and the run layout. Imports nothing else of
the project."""
