"""The data pipeline: sources, streaming reads, preprocessing and TorchRec batches.

* :mod:`~mome_rec.data.sources` resolves a data config to split files.
* :mod:`~mome_rec.data.synthetic` generates AliExpress-shaped data.
* :mod:`~mome_rec.data.reader` streams record batches from CSV and parquet.
* :mod:`~mome_rec.data.preprocess` fits vocabularies and dense statistics and applies them.
* :mod:`~mome_rec.data.batches` turns files into per-rank, shuffled TorchRec batches.
* :mod:`~mome_rec.data.convert` converts CSV files to parquet.
"""
