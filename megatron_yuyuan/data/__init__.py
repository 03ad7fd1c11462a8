"""Training data: synthetic tokens (``mock``) and, later, MedQuAD."""
