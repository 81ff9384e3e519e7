"""Simulated cameras for `cl-service simulate`.

`surface` renders labelled, reproducible images of metal surfaces with drawn defects, and
`folder` streams real images from a folder with one sub-folder per class. Both let the
service be exercised end to end without a factory line.
"""
