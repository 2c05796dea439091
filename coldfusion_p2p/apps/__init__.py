"""Whole runs built from the library: the demo swarm, the in-process simulator, the bundled contributors."""
