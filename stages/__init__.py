"""The DVC stages: each parses ``params.yaml``, calls the library and writes the outputs."""
