"""Pure-torch reference implementations: the `default` kernels of the ops and the test oracles."""
