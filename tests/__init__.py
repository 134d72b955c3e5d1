"""Tests for ssp-broker (run with trial)."""
