"""Engines behind one interface (base.Engine): single device, DDP, FSDP2 and DeepSpeed ZeRO; registry.build_engine
picks one. The package imports nothing, so no engine's import runs another's."""
