"""Shipped YAML recipes (installed as zotune.recipes); list them with `zotune ls`."""
