"""Guest-side helpers: the fsfreeze-hook dispatcher and the database lock holder."""
