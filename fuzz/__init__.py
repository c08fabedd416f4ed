"""atheris harnesses for the sans-I/O wire layer; see README.md. The ``check`` function of each
harness runs without atheris, so tests/test_wire_fuzz.py replays seeds and crash inputs with it."""
