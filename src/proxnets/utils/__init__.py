"""Small helpers shared by every module: argument validation, atomic I/O, timing."""
