"""Runnable examples (data prep, trace generation, the CPU model); a package, so they import each other as
`examples.<module>`."""
