"""Zeroth-order training inside other libraries' trainers (`zotune.integrations.trl`)."""
