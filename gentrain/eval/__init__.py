"""Scoring trained models: one registry of evaluators, the digits and shapes judges."""
