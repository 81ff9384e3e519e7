"""Stream evaluation: a folder of class sub-folders replayed as a camera stream, and the references beside it."""
