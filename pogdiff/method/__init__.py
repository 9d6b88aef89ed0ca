"""The method: neighbours (Eq. 8-9), text density (Eq. 10-11), objectives (Eq. 12-13 and the baselines)."""
