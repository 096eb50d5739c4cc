"""Data layer: sources (files, shard directories, hf:NAME), formats (text, instruction, classification, chat),
tokenization and packing into memory-mapped cache files (prepared once per job or node), weighted mixtures of
several sources, collation and a resumable distributed sampler. Import from the modules themselves (pipeline,
loader, once, formats, sources, collate, sampler): the package imports nothing, so no module's import runs
another's."""
