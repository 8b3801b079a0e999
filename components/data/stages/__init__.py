"""The data preparation's stages, as datatrove pipeline steps run in sharded tasks.

    clean      one task per input shard: read -> count malformed rows -> filters -> MinHash
               signatures; writes the cleaned documents, signatures and LSH band hashes
    buckets    one task per (group of LSH bands, hash range): candidate pairs of equal band hashes,
               kept when their estimated Jaccard similarity reaches the threshold
    cluster    one task: union-find over the verified pairs -> documents to drop per shard,
               the train / validation split's repairs, the dedup report
    tokenizer  one task: byte-level BPE trained on a sample of the kept training documents
    tokenize   one task per shard: kept documents -> token files per (domain, split)
    finish     one task: token index, report, rejects files

Every task reads and writes only files named by its rank under the preparation folder (see
`layout`), holds at most one batch of documents in memory, and may run on any machine that
sees that folder. `tessera.components.data.preparation` runs them in order on an engine.
"""
