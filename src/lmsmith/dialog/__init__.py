"""Document-grounded dialogue (MultiDoc2Dial): passages, retrieval, grounding, generation.

``corpus`` (documents → passages, retrieval sets), ``retrieve`` (BM25, dense, hybrid, rerank),
``train`` (DPR-style bi-encoder, cross-encoder), ``ground``, ``generate``, ``pipeline``
(retrieve → ground → generate), ``serve``; ``tasks`` has one function per ``lmsmith dialog``
command and ``cli`` what each prints.
"""
