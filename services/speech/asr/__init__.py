"""ASR worker: audio in (inline or from the object store), segments as they are decoded, a transcript."""
