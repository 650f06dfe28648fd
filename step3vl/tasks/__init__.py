"""Procedural tasks with their answer checkers, used by training, evaluation and tests."""
