"""Ingest: validate each camera image, store it durably, answer it."""
