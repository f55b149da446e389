"""Model recipes for the demo, the tests and the benchmarks (see README.md).

- ``models.minilm``: all-MiniLM-L6-v2, real weights (a model directory).
- ``models.tiny``: tiny random-init models of every common transformer family.
- ``models.bert_base``: a random-init BERT-base-shaped encoder for long-sequence benchmarks.
"""
