"""edgeplug's benchmarks (run by hand, never imported by edgeplug). `bench.protocol` is the shared protocol."""
