"""The tau2 episode engine and slime's custom generate function."""
