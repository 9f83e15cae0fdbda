"""The lab: real QEMU processes and the built-in tiny guest, for the demo, the tests and the benchmarks."""
