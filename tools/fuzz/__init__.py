"""Fuzzing gpupool: coverage-guided harnesses (atheris) of the frame reader, the message
decoders and the executor, mutated frames against a live server, and schemathesis against the
controller's API. `python -m tools.fuzz --help`; `make fuzz`."""
