"""Files, the catalog and the bulk pipeline: folders in, catalog rows and FAISS vectors out."""
