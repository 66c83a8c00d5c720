"""The benchmark (view families of real photos), its photo sources, and the retrieval metrics (revisitop mAP, P@k, recall@k)."""
