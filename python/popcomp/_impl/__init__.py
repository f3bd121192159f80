"""Device kernels of the popcomp ops: thin wrappers that pass raw pointers to the compiled core."""
