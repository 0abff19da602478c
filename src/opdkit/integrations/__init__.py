"""Integrations of opdkit's losses and gates into existing training engines (each one an optional extra)."""
