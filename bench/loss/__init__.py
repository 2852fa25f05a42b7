"""The loss microbenchmark: ``fused_linear_sdft_loss`` against its peers and the GEMM floor,
over a grid of shapes (``python -m bench.loss``), and the same cases under pytest-benchmark
(``pytest bench/loss``)."""
