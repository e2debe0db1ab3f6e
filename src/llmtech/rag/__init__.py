"""Retrieval-augmented generation, one module per stage.

loaders → chunking → embed → stores (FAISS / Chroma / pgvector / Elasticsearch) and bm25
→ fusion (hybrid) → rerank → generate (answers with citations) → metrics; ``beir`` runs the
standard BEIR evaluation, ``kb`` ties the stages into a persistent knowledge base.
"""
