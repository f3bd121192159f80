"""The kernels of the popcomp ops, one package per backend and one module per op in each."""
