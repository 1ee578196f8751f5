"""Document-grounded dialogue (MultiDoc2Dial): passages, retrieval, grounding, generation.

Part 1 (this package so far): ``corpus`` (documents → passages, retrieval sets), ``retrieve``
(BM25, dense, hybrid, rerank), ``train`` (DPR-style bi-encoder, cross-encoder), ``cli``.
"""
