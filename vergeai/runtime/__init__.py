"""Model workers: the only package that imports llama_cpp."""
