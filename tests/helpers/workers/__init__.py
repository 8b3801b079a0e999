"""Worker programs the tests run in other processes (tests/helpers/launch.py launches them)."""
