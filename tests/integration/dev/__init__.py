"""Tests of the developer tooling in betrace.dev (local Kafka manager)."""
