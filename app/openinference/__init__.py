"""The Open Inference Protocol (KServe V2) over the same request pipeline as v1."""
