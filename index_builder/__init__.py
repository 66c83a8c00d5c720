"""FAISS index building and the thin query library (no Beam; torch only to embed query images)."""
