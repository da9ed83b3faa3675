"""Developer / test / CI tooling (not used by the betrace runtime)."""
