"""FAISS index building and the thin query library (no Beam; torch only to embed query images).

Modules, each a few functions over numpy arrays and FAISS indexes (the FAISS contrib style):
    embeddings  read embedding runs: streamed shard batches, which rows are live (re-embeds,
                tombstones), model/dimension checks
    train       choose a factory (size + memory budget, as autofaiss), reservoir sample, train,
                quantisation error
    add         add embedding shards to copies of the trained index in a process pool
    merge       merge shards (in memory or on disk) or search them together (ShardedIndex)
    recall      exact k-NN over a stream, leave-one-out recall, nprobe/efSearch tuning
    manifest    the manifest (DESIGN.md section 4): checksums, atomic write, verification
    build       the train / add / merge steps over an index folder, and the one-shot build
    publish     upload a built index folder to object storage, manifest.json last
    search      open_index / RemapIndex: the query library
    id_map      the query library's id -> URI map (sorted ids + one Arrow string buffer)
    synthetic   clustered synthetic embedding runs for tests and benchmarks
"""
