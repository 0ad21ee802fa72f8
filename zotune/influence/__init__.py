"""Data influence from a ZO trajectory (TracIn along the run): per-example projections recorded
by training (`rows`), attribution of a loss change and self-influence (`trace`)."""
